"""The docs' table of the default pipeline's numbers (docs/results/default-run.md), regenerated from a finished run
rather than typed in.

    make run                                            # the default pipeline (params.yaml)
    .venv/bin/python bench/measured.py                  # read its outputs, write the JSON, rewrite the table
    .venv/bin/python bench/measured.py --check          # the table is what the JSON renders (a test runs this)

Reads ``outputs/*/metrics.json`` and ``outputs/data/stats.json`` (the paths of ``--params``), writes
``bench/results/measured.json`` with the machine (CPU model and its AVX/AMX flags), the date and the git commit,
and replaces the page's block between the ``measured:start`` and ``measured:end`` markers with the table that
JSON renders. The numbers of one seed on one machine: other CPUs give other numbers (the benchmarks have the spread
over data draws).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

START, END = "<!-- measured:start (bench/measured.py writes this block) -->", "<!-- measured:end -->"
CATEGORIES = ("arithmetic", "word_problem", "facts", "harmful", "benign_lookalike")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(m: dict, key: str) -> str:
    return f"{_pct(m[key])} [{_pct(m[key + '_ci_low'])}, {_pct(m[key + '_ci_high'])}]"


def collect(config) -> list[list[str]]:
    """(what, value) rows from a finished run's outputs (the stages' own metrics; nothing recomputed)."""
    from rlhf_core.io import read_json
    from rlhf_core.stages import output_dir

    def metrics(stage: str) -> dict:
        return read_json(Path(output_dir(config, stage)) / "metrics.json")

    stats = read_json(Path(config.paths.data) / "stats.json")
    sft, rm, rm_eval, ppo, ev = (metrics(s) for s in ("sft", "rm", "rm-eval", "ppo", "eval"))
    tokens, agreement, demo = stats["token_lengths"], stats["annotator_gold_agreement"], stats["demonstrator"]
    gold = "eval/gold/win_rate" in ev
    rows = [
        ["stage seconds: SFT / RM / rm-eval / PPO / eval",
         " / ".join(f"{m[k]:.0f}" for m, k in ((sft, "sft/seconds"), (rm, "rm/seconds"), (rm_eval, "rm_eval/seconds"),
                                                 (ppo, "ppo/seconds"), (ev, "eval/seconds")) if k in m)],
        ["data: rows per split", ", ".join(f"{k} {v:,}" for k, v in stats["counts"].items())],
        ["prompt tokens p50 / p90 / max; response tokens p50 / p90 / max",
         f"{tokens['prompt']['p50']:.0f} / {tokens['prompt']['p90']:.0f} / {tokens['prompt']['max']}; "
         f"{tokens['response']['p50']:.0f} / {tokens['response']['p90']:.0f} / {tokens['response']['max']}"],
        ["annotator-gold agreement (RM train / test): the ceiling of annotator accuracy",
         f"{_pct(agreement['rm_train'])} / {_pct(agreement['rm_test'])}"],
        ["demonstrations: flawless / mean gold score",
         f"{_pct(demo['sft_flawless_rate'])} / {demo['sft_mean_gold_score']:.2f}"],
        [f"SFT ({sft['sft/steps']} steps, global batch {sft['sft/global_batch']}): validation loss / perplexity",
         f"{sft['sft/val_loss']:.3f} / {sft['sft/ppl']:.2f}"],
        ["SFT sampled answers on validation prompts: mean gold score / flawless",
         f"{sft['sft/sample_gold_score']:.2f} / {_pct(sft['sft/sample_flawless_rate'])}"],
        [f"RM ({rm['rm/steps']} steps, batch {rm['rm/global_batch']}): validation accuracy (best step "
         f"{rm['rm/best_step']})", _pct(rm["rm/val_accuracy"])],
        [f"RM test accuracy against gold labels ({rm_eval['rm_eval/pairs']} pairs, 95% CI)",
         f"**{_interval(rm_eval, 'rm_eval/gold_accuracy')}**"],
        ["RM test accuracy against annotator labels (95% CI)", _interval(rm_eval, "rm_eval/accuracy")],
        ["RM gold accuracy per category: " + ", ".join(c.replace("_", " ") for c in CATEGORIES),
         " / ".join(_pct(rm_eval[f"rm_eval/{c}/gold_accuracy"]) for c in CATEGORIES
                    if f"rm_eval/{c}/gold_accuracy" in rm_eval)],
        ["RM calibration error (ECE) against annotator / gold labels",
         f"{rm_eval['rm_eval/ece']:.3f} / {rm_eval['rm_eval/gold_ece']:.3f}"],
        [f"PPO ({config.ppo.preset}, {ppo['ppo/steps']} iterations x {config.ppo.rollout_size} rollouts), last "
         "iterations: KL / length / policy perplexity / RM score / collapse warnings",
         f"{ppo['ppo/objective_kl']:.2f} nats / {ppo['ppo/rollout_response_length']:.1f} / "
         f"{ppo['ppo/monitor_ppl_policy']:.2f} / {ppo['ppo/objective_scores']:.2f} / {ppo['ppo/collapse_warnings']}"],
    ]  # fmt: skip
    if "ppo/eval_gold_score_policy" in ppo:
        rows.append([f"gold score on {ppo['ppo/eval_prompts']} eval prompts, SFT -> PPO (95% CI)",
                     f"{ppo['ppo/eval_gold_score_sft']:.2f} -> **{ppo['ppo/eval_gold_score_policy']:.2f}**; paired "
                     f"gain {ppo['ppo/eval_gold_gain']:+.2f} [{ppo['ppo/eval_gold_gain_ci_low']:+.2f}, "
                     f"{ppo['ppo/eval_gold_gain_ci_high']:+.2f}]"])  # fmt: skip
    for judge in ("gold", "rm") if gold else ("rm",):
        p = f"eval/{judge}/"
        rows.append([f"PPO vs SFT, {judge} judge: win / tie / lose, win rate (95% CI)",
                     f"{_pct(ev[p + 'win'])} / {_pct(ev[p + 'tie'])} / {_pct(ev[p + 'lose'])}, "
                     f"**{_interval(ev, p + 'win_rate')}**"])  # fmt: skip
    if gold:
        gap, ceiling = 100 * ev["eval/overoptimisation_gap"], _pct(ev["eval/gold/cleanup_ceiling"])
        rows.append(["over-optimisation gap (RM-judged minus gold-judged win rate) / clean-up ceiling",
                     f"{gap:+.1f} points / {ceiling}"])  # fmt: skip
    return rows


def render(record: dict) -> str:
    machine = record["machine"]
    flags = ", ".join(machine.get("flags", [])) or "none listed"
    lines = [
        START,
        f"The default pipeline (`{record['command']}`), measured by `bench/measured.py` on {record['date']} at commit "
        f"`{record['commit']}`: {machine.get('model', '?')}, {machine['cores']} cores ({flags}). One seed on one "
        "machine: another CPU gives other numbers, and [the benchmarks](benchmarks.md) have the spread over data "
        "draws.",
        "",
        "| what | value |",
        "| --- | --- |",
        *(f"| {what} | {value} |" for what, value in record["rows"]),
        END,
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str, where: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{where}: no '{START}' ... '{END}' block to replace")
    head, rest = text.split(START, 1)
    return head + block + rest.split(END, 1)[1]


def current_block(text: str) -> str:
    return START + text.split(START, 1)[1].split(END, 1)[0] + END


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.config import load_config
    from rlhf_core.io import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", action="append", default=[], help="an override, as the run had it")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "measured.json")
    parser.add_argument("--readme", type=Path, default=REPO / "docs" / "results" / "default-run.md")
    parser.add_argument("--check", action="store_true", help="only compare the page's block with the JSON")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    if args.check:
        expected = render(json.loads(args.results.read_text()))
        if current_block(readme) != expected:
            print(f"{args.readme}: the measured block differs from {args.results}; rerun bench/measured.py")
            return 1
        return 0
    from bench.real_model_options import cpu_description

    config = load_config(args.params, args.set)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    record = {
        "command": "make run" if not args.set and args.params == REPO / "params.yaml" else " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip() or "?",
        "machine": cpu_description(),
        "rows": collect(config),
    }
    atomic_write_json(args.results, record)
    atomic_write_text(args.readme, replace_block(readme, render(record), str(args.readme)))
    print(render(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

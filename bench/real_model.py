"""A real-model recipe through all six stages, each stage timed with its peak memory; resumable.

    .venv/bin/python bench/real_model.py bench/recipes/smollm2_sim.yaml --compare vanilla
    .venv/bin/python bench/real_model.py bench/recipes/smollm2_hh.yaml
    .venv/bin/python bench/real_model.py bench/recipes/smollm2_hh.yaml --variant debias ppo.length_debias=true
    .venv/bin/python bench/real_model.py RECIPE --set ppo.steps=2 --results /tmp/smoke.json   # a smoke run

Every stage runs as its own ``python -m rlhf_core.cli STAGE --params RECIPE`` process, so its peak memory is that
process's maximum resident set size (``wait4``) and its time is the process's wall time, model loading included.
``--compare PRESET`` adds PPO and the win-rate evaluation again with ``ppo.preset=PRESET`` at the same settings,
into ``<paths.ppo>_<PRESET>`` and ``<paths.eval>_<PRESET>`` (same data, SFT policy and reward model);
``--variant NAME OVERRIDE...`` does the same with any PPO or eval overrides.

Results go to ``bench/results/real_model_<recipe name>.json`` after every stage (atomically), with the CPU's model
and flags, each stage's seconds, peak RSS and its ``metrics.json``. Rerunning the same command skips the stages
already done with the same recipe and overrides; a PPO stage cut off midway resumes from its newest checkpoint
(``ppo.checkpoint.resume: auto``). Each stage's console output is kept in ``<paths.data>/../bench_logs/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description  # noqa: E402
from rlhf_core.io import atomic_write_json  # noqa: E402
from rlhf_core.stages import STAGES  # noqa: E402

HEADLINE = (  # (label, stage, metric key) shown in the summary when the stage wrote it
    ("SFT val loss", "sft", "sft/val_loss"),
    ("RM accuracy (annotator labels)", "rm-eval", "rm_eval/accuracy"),
    ("RM gold accuracy", "rm-eval", "rm_eval/gold_accuracy"),
    ("PPO eval RM score SFT -> policy", "ppo", ("ppo/eval_rm_score_sft", "ppo/eval_rm_score_policy")),
    ("PPO eval gold score SFT -> policy", "ppo", ("ppo/eval_gold_score_sft", "ppo/eval_gold_score_policy")),
    ("PPO collapse warnings", "ppo", "ppo/collapse_warnings"),
    ("win rate (primary judge)", "eval", ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high")),
    ("RM-judged win rate", "eval", "eval/rm/win_rate"),
    (
        "RM-judged length-controlled win rate",
        "eval",
        ("eval/rm/lc_win_rate", "eval/rm/lc_win_rate_ci_low", "eval/rm/lc_win_rate_ci_high"),
    ),
    ("gold win rate", "eval", "eval/gold/win_rate"),
    (
        "gold length-controlled win rate",
        "eval",
        ("eval/gold/lc_win_rate", "eval/gold/lc_win_rate_ci_low", "eval/gold/lc_win_rate_ci_high"),
    ),
    ("answer tokens SFT -> PPO", "eval", ("eval/response_tokens_sft", "eval/response_tokens_ppo")),
    ("answers declining SFT -> PPO", "eval", ("eval/refusal_share_sft", "eval/refusal_share_ppo")),
    ("clean-up ceiling", "eval", "eval/gold/cleanup_ceiling"),
    ("over-optimisation gap", "eval", "eval/overoptimisation_gap"),
)


def stage_plan(config, compare: list[str], variants: list[list[str]] = ()) -> list[tuple[str, str, list[str]]]:
    """(label, stage, extra overrides) in order: the six stages, then PPO + eval again per compared preset and
    per variant (``[NAME, override, ...]``), each from the same data, SFT policy and reward model."""
    plan = [(stage, stage, []) for stage in STAGES]
    runs = [(preset, [f"ppo.preset={preset}"]) for preset in compare] + [(v[0], v[1:]) for v in variants]
    for name, overrides in runs:
        paths = [f"paths.ppo={config.paths.ppo}_{name}", f"paths.eval={config.paths.eval}_{name}"]
        plan += [(f"ppo[{name}]", "ppo", [*overrides, *paths]), (f"eval[{name}]", "eval", paths)]
    return plan


def run_stage_process(stage: str, recipe: Path, overrides: list[str], log: Path) -> dict:
    """Run one stage in a child process; its wall seconds, peak RSS (GiB) and exit code."""
    cmd = [sys.executable, "-m", "rlhf_core.cli", stage, "--params", str(recipe)]
    for override in overrides:
        cmd += ["--set", override]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "returncode": os.waitstatus_to_exitcode(status)}  # fmt: skip


def stage_metrics(config, stage: str) -> dict:
    """What the stage wrote: ``stats.json`` of prepare, ``metrics.json`` of the others ({} when absent)."""
    directory = Path(getattr(config.paths, stage.replace("-", "_") if stage != "prepare" else "data"))
    path = directory / ("stats.json" if stage == "prepare" else "metrics.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(metrics: dict, key) -> str | None:
    keys = key if isinstance(key, tuple) else (key,)
    if not all(k in metrics for k in keys):
        return None
    values = [metrics[k] for k in keys]
    if isinstance(key, tuple) and len(keys) == 3:  # value [low, high]
        return f"{values[0]:.3f} [{values[1]:.3f}, {values[2]:.3f}]"
    return " -> ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)


def print_summary(results: dict) -> None:
    print(f"\n{'stage':<14} {'seconds':>8} {'peak RSS GiB':>13}")
    for label, record in results["stages"].items():
        print(f"{label:<14} {record['seconds']:>8.0f} {record['peak_rss_gib']:>13.2f}")
    print()
    for label, record in results["stages"].items():
        stage = label.split("[")[0]
        suffix = label[len(stage) :]
        for name, wanted, key in HEADLINE:
            text = _fmt(record.get("metrics", {}), key) if stage == wanted else None
            if text is not None:
                print(f"{name + suffix:<44} {text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="a params file (bench/recipes/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="group.key=value override")
    parser.add_argument("--compare", action="append", default=[], help="also run PPO + eval with this preset")
    parser.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME_OR_OVERRIDE",
                        help="also run PPO + eval with these overrides, into <paths.ppo>_NAME: "
                        "--variant debias ppo.length_debias=true")  # fmt: skip
    parser.add_argument("--results", type=Path, help="default: bench/results/real_model_<recipe>.json")
    args = parser.parse_args(argv)

    from rlhf_core.config import load_config

    config = load_config(args.recipe, args.overrides)
    results_path = args.results or REPO / "bench" / "results" / f"real_model_{args.recipe.stem}.json"
    recipe_digest = hashlib.sha256(args.recipe.read_bytes()).hexdigest()
    key = {"recipe": str(args.recipe), "recipe_sha256": recipe_digest, "overrides": args.overrides}
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("key") != key:
        results = {"key": key, "stages": {}}
    results["cpu"] = cpu_description()
    logs = Path(config.paths.data).parent / "bench_logs"
    for variant in args.variant:
        if len(variant) < 2 or "=" in variant[0] or not all("=" in o for o in variant[1:]):
            parser.error(f"--variant {' '.join(variant)}: give a name, then group.key=value overrides")
    for label, stage, extra in stage_plan(config, args.compare, args.variant):
        if results["stages"].get(label, {}).get("returncode") == 0:
            continue
        overrides = [*args.overrides, *extra]
        print(f"{label}: running (log: {logs / label}.log)", flush=True)
        record = run_stage_process(stage, args.recipe, overrides, logs / f"{label}.log")
        stage_config = load_config(args.recipe, overrides)
        record["metrics"] = stage_metrics(stage_config, stage) if record["returncode"] == 0 else {}
        results["stages"][label] = record
        atomic_write_json(results_path, results)
        print(f"{label}: {record['seconds']:.0f} s, peak RSS {record['peak_rss_gib']:.2f} GiB", flush=True)
        if record["returncode"] != 0:
            tail = (logs / f"{label}.log").read_text()[-3000:]
            sys.exit(f"{label} failed (exit {record['returncode']}); the end of its log:\n{tail}")
    print_summary(results)
    print(f"\nwritten to {results_path}")


if __name__ == "__main__":
    main()

"""The PPO stage with its forwards at full width (the code before issue 24) and cut to token budgets, alternating.

    git worktree add /tmp/before b2e4421     # the commit before micro-batches were cut
    git worktree add /tmp/sliced ead219f     # groups sliced from the buffer's layout (left-padded queries)
    .venv/bin/python bench/ppo_budgets.py --tree before=/tmp/before --tree sliced=/tmp/sliced \
        --configs before,sliced,budget_4096,budget_512,budget_256 --work-dir /tmp/ppo_budgets
    # what the critic costs: PPO-max against the critic-free presets, time per phase and peak memory
    .venv/bin/python bench/ppo_budgets.py --configs ppo_max,grpo,rloo,reinforce_pp --repeats 2 \
        --work-dir /tmp/critic_cost --results bench/results/critic_cost.json

Each run is ``rlhf ppo`` for ``--steps`` iterations on the default pipeline's data, SFT policy and reward model
(``make run`` first; or ``--params RECIPE --base`` that recipe's outputs), no checkpoints, no tracking, in a fresh
process. A configuration named by ``--tree`` runs the
stage from that checkout (with its own params.yaml); the others run this checkout with the token budgets named
(``ppo.max_tokens_per_micro_batch`` / ``ppo.max_tokens_per_forward``). Runs alternate configuration by
configuration, ``--repeats`` times. A run whose ``metrics.json`` is already in the work directory is read back, not
run again (resumable). Reported per configuration: the mean seconds per iteration of each phase after the critic
warm-up, the stage's seconds, the positions its forwards computed per real token (``batch/*``) and the largest
difference of the logged KL and RM score from the first configuration's (float summation order moves them; the
sampled tokens stay the same while the response lengths agree), and the stage process's peak resident memory.
Writes ``bench/results/ppo_budgets.json`` after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description, read_train_csv, run_stage_process  # noqa: E402
from bench.robustness import PRESET_SETTINGS  # noqa: E402
from rlhf_core.io import atomic_write_json  # noqa: E402

PHASES = ("generation", "scoring", "training")
BUDGETS = {"budget_4096": (4096, 8192), "budget_512": (512, 1024), "budget_256": (256, 512)}
# What a critic costs (issue 29): PPO-max against the critic-free presets at the same rollout size, each with the
# settings the robustness study gives it (grpo and rloo: 4 answers per prompt).
PRESETS = {name: [f"ppo.preset={name}", *PRESET_SETTINGS.get(name, [])]
           for name in ("ppo_max", "grpo", "rloo", "reinforce_pp")}  # fmt: skip
POSITIONS = ("full_positions_per_token", "scoring_positions_per_token", "update_positions_per_token",
             "update_micro_batches")  # fmt: skip


def run_stage(name: str, tree: Path, out: Path, args) -> None:
    sets = [f"ppo.steps={args.steps}", "ppo.checkpoint.resume=never", "tracking.enabled=false",
            *(f"paths.{p}={args.base / p}" for p in ("data", "sft", "rm")), f"paths.ppo={out}"]  # fmt: skip
    if name in BUDGETS:
        micro, forward = BUDGETS[name]
        sets += [f"ppo.max_tokens_per_micro_batch={micro}", f"ppo.max_tokens_per_forward={forward}"]
    sets += PRESETS.get(name, [])
    peak = run_stage_process("ppo", sets, tree, out.with_suffix(".log"), params=args.params)
    atomic_write_json(out / "peak_rss.json", {"peak_rss_gib": peak})


def read_run(out: Path, warmup: int) -> dict:
    rows = read_train_csv(out)
    after = rows[warmup:]

    def mean(key: str, of=after) -> float | None:
        values = [float(r[key]) for r in of if r.get(key) not in (None, "")]
        return sum(values) / len(values) if values else None

    metrics = json.loads((out / "metrics.json").read_text())
    rss = out / "peak_rss.json"  # absent for runs made before it was recorded
    return {
        **{p: mean(f"time/{p}") for p in PHASES},
        "stage_seconds": metrics["ppo/seconds"],
        "peak_rss_gib": json.loads(rss.read_text())["peak_rss_gib"] if rss.is_file() else None,
        **{k: mean(f"batch/{k}", rows) for k in POSITIONS},
        "curves": {
            k: [float(r[k]) for r in rows] for k in ("objective/kl", "objective/scores", "rollout/response_length")
        },  # fmt: skip
    }


def summary(runs: list[dict]) -> str:
    names = list(dict.fromkeys(r["config"] for r in runs))
    reference = next(r for r in runs if r["config"] == names[0])["curves"]
    lines = ["| configuration | s/it generation | scoring | training | stage s | peak RSS GiB | positions per real "
             "token: full / scoring / update | micro-batches per minibatch | max diff of KL, score vs first |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in names:
        mine = [r for r in runs if r["config"] == name]

        def avg(key: str, mine: list[dict] = mine) -> float | None:
            values = [r[key] for r in mine if r[key] is not None]
            return sum(values) / len(values) if values else None

        drift = [max(abs(a - b) for a, b in zip(reference[k], r["curves"][k], strict=True))
                 for r in mine for k in ("objective/kl", "objective/scores")]  # fmt: skip
        positions = " / ".join("-" if avg(k) is None else f"{avg(k):.3f}" for k in POSITIONS[:3])
        micro = "-" if avg("update_micro_batches") is None else f"{avg('update_micro_batches'):.2f}"
        rss = "-" if avg("peak_rss_gib") is None else f"{avg('peak_rss_gib'):.2f}"
        lines.append(f"| {name} ({len(mine)} runs) | {avg('generation'):.3f} | {avg('scoring'):.3f} | "
                     f"{avg('training'):.3f} | {avg('stage_seconds'):.1f} | {rss} | {positions} | {micro} | "
                     f"{max(drift):.1e} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="configuration NAME runs the stage from the checkout PATH (repeatable)",
    )
    parser.add_argument("--base", type=Path, default=REPO / "outputs", help="pipeline outputs (data, sft, rm)")
    parser.add_argument("--params", type=Path, help="a recipe for every configuration (default: params.yaml)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5, help="critic warm-up iterations left out of the means")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--configs",
        default="before,budget_4096,budget_512,budget_256",
        help="comma-separated: budget_4096, budget_512, budget_256, a preset (ppo_max, grpo, rloo, reinforce_pp) or "
        "a --tree name",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ppo_budgets"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "ppo_budgets.json")
    args = parser.parse_args()
    trees = {name: Path(path) for name, _, path in (t.partition("=") for t in args.tree)}
    names = [n for n in args.configs.split(",") if n in BUDGETS or n in PRESETS or n in trees]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_description(), "steps": args.steps, "warmup": args.warmup, "budgets": BUDGETS, "runs": []}
    for repeat in range(1, args.repeats + 1):
        for name in names:
            out = args.work_dir / f"{name}_{repeat}"
            if not (out / "metrics.json").is_file():
                print(f"running {out.name}", flush=True)
                run_stage(name, trees.get(name, REPO), out, args)
            results["runs"].append({"config": name, "repeat": repeat, **read_run(out, args.warmup)})
            atomic_write_json(args.results, results)
    print(summary(results["runs"]))


if __name__ == "__main__":
    main()

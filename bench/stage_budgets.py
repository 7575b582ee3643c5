"""SFT and reward-model steps with fixed-size micro-batches and with token budgets, alternating in one run.

    .venv/bin/python bench/stage_budgets.py --params bench/recipes/smollm2_sim.yaml --steps 8 --budgets null,1024,2048

Each run is ``rlhf sft`` or ``rlhf rm`` for ``--steps`` optimizer steps in a fresh process, no tracking, no sample
generations, validation once at the end, on the data (and, for the RM, the SFT policy) the params file names:
run that pipeline's ``prepare`` and ``sft`` first. ``*.max_tokens_per_micro_batch`` is set to each of ``--budgets``
(``null``: fixed micro-batches of ``micro_batch_size``). Every configuration steps through the same examples in the
same order, so the runs differ only in how each step's examples are grouped into micro-batches. Reported per stage
and budget: the stage's seconds (loading, the steps, one validation and saving: the same fixed work in every run),
the positions its forwards computed per real token (``sft/positions_per_token``, ``rm/positions_per_token``) and
the last training loss (equal up to float summation order). Runs alternate budget by budget, ``--repeats`` times;
a run whose ``metrics.json`` exists is read back (resumable). Writes ``--results`` after every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description  # noqa: E402


def run_stage(stage: str, budget: str, out: Path, args) -> None:
    sets = [f"{stage}.max_steps={args.steps}", f"{stage}.eval_every={args.steps}", "tracking.enabled=false",
            f"{stage}.max_tokens_per_micro_batch={budget}", f"paths.{stage}={out}"]  # fmt: skip
    sets += ["sft.num_sample_generations=0"] if stage == "sft" else ["rm.reward_stats_prompts=8"]
    command = [sys.executable, "-m", "rlhf_core.cli", stage, "--params", str(args.params),
               *(x for s in sets for x in ("--set", s))]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)


def read_run(stage: str, out: Path) -> dict:
    with open(out / "plots" / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((out / "metrics.json").read_text())
    ratios = [float(r[f"{stage}/positions_per_token"]) for r in rows]
    return {
        "seconds": metrics[f"{stage}/seconds"],
        "positions_per_token": sum(ratios) / len(ratios),
        "last_loss": float(rows[-1][f"{stage}/loss"]),
    }


def summary(runs: list[dict]) -> str:
    lines = ["| stage | budget | runs | stage seconds (mean) | positions per real token | last training loss |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for key in dict.fromkeys((r["stage"], r["budget"]) for r in runs):
        mine = [r for r in runs if (r["stage"], r["budget"]) == key]
        seconds = sum(r["seconds"] for r in mine) / len(mine)
        lines.append(f"| {key[0]} | {key[1]} | {len(mine)} | {seconds:.1f} | {mine[0]['positions_per_token']:.3f} | "
                     f"{mine[0]['last_loss']:.5f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="the pipeline's params file")
    parser.add_argument("--stages", default="sft,rm")
    parser.add_argument("--budgets", default="null,1024,2048", help="comma-separated; null: fixed micro-batches")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/stage_budgets"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "stage_budgets.json")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_description(), "params": str(args.params), "steps": args.steps, "runs": []}
    for repeat in range(1, args.repeats + 1):
        for stage in args.stages.split(","):
            for budget in args.budgets.split(","):
                out = args.work_dir / f"{stage}_{budget}_{repeat}"
                if not (out / "metrics.json").is_file():
                    print(f"running {out.name}", flush=True)
                    run_stage(stage, budget, out, args)
                results["runs"].append({"stage": stage, "budget": budget, "repeat": repeat, **read_run(stage, out)})
                tmp = args.results.with_suffix(".tmp")
                tmp.write_text(json.dumps(results, indent=1))
                tmp.replace(args.results)
    print(summary(results["runs"]))


if __name__ == "__main__":
    main()

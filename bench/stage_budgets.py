"""SFT and reward-model steps with fixed-size micro-batches and with token budgets, alternating in one run.

    .venv/bin/python bench/stage_budgets.py --params bench/recipes/smollm2_sim.yaml --steps 8 --budgets null,1024,2048
    # the RM without a trained SFT policy: --set rm.init_from=models/smollm2-135m-instruct

Each run is ``rlhf sft`` or ``rlhf rm`` for ``--steps`` optimizer steps in a fresh process, no tracking, no sample
generations, validation once at the end, on the data (and, for the RM, the SFT policy) the params file names:
run that pipeline's ``prepare`` and ``sft`` first. ``*.max_tokens_per_micro_batch`` is set to each of ``--budgets``
(``null``: fixed micro-batches of ``micro_batch_size``). Every configuration steps through the same examples in the
same order, so the runs differ only in how each step's examples are grouped into micro-batches. Reported per stage
and budget: the stage's seconds (loading, the steps, one validation and saving: the same fixed work in every run),
the positions its forwards computed per real token (``sft/positions_per_token``, ``rm/positions_per_token``) and
the last training loss (equal up to float summation order). Runs alternate budget by budget, ``--repeats`` times;
a run whose ``metrics.json`` exists is read back (resumable). Writes ``--results`` after every run.

``--positions-only`` trains nothing: it replays each stage's order of global batches from the prepared data and
reports the positions per real token every budget would compute (seconds, no model):

    .venv/bin/python bench/stage_budgets.py --params bench/recipes/smollm2_hh.yaml --positions-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description, read_train_csv, run_stage_process  # noqa: E402
from rlhf_core.io import atomic_write_json  # noqa: E402


def run_stage(stage: str, budget: str, out: Path, args) -> None:
    sets = [f"{stage}.max_steps={args.steps}", f"{stage}.eval_every={args.steps}", "tracking.enabled=false",
            f"{stage}.max_tokens_per_micro_batch={budget}", f"paths.{stage}={out}"]  # fmt: skip
    sets += ["sft.num_sample_generations=0"] if stage == "sft" else ["rm.reward_stats_prompts=8"]
    sets += args.extra
    run_stage_process(stage, sets, REPO, out.with_suffix(".log"), args.params)


def read_run(stage: str, out: Path) -> dict:
    rows = read_train_csv(out)
    metrics = json.loads((out / "metrics.json").read_text())
    ratios = [float(r[f"{stage}/positions_per_token"]) for r in rows]
    return {
        "seconds": metrics[f"{stage}/seconds"],
        "positions_per_token": sum(ratios) / len(ratios),
        "last_loss": float(rows[-1][f"{stage}/loss"]),
    }


def replayed_positions(params: Path, budgets: list[str]) -> dict[str, dict[str, float]]:
    """Positions per real token of every optimizer step of the SFT and RM stages under each budget, from the
    stages' own encoding, order and grouping (a pair's real tokens: both of its sequences)."""
    from rlhf_core.config import load_config, steps_for
    from rlhf_core.data.batching import fixed_size_groups, token_budget_groups
    from rlhf_core.data.order import global_order
    from rlhf_core.data.rows import load_split
    from rlhf_core.models.tokenizer import load_tokenizer
    from rlhf_core.trainers.rm import encode_pairs, mismatched_pairs, split_train_val
    from rlhf_core.trainers.sft import _encode

    config = load_config(params, [])
    data = Path(config.paths.data)
    tokenizer = load_tokenizer(data / "tokenizer")
    sft = _encode(tokenizer, load_split(data, "sft_train", config.data))
    rm_rows, _ = split_train_val(load_split(data, "rm_train", config.data), config.rm.val_fraction, config.rm.seed)
    rm_rows += mismatched_pairs(rm_rows, config.rm.mismatch_fraction, config.rm.seed)
    pairs = encode_pairs(tokenizer, rm_rows)
    items = {
        "sft": (config.sft, [(len(q) + len(r), len(q) + len(r)) for q, r in sft], 1),
        "rm": (config.rm, [(len(q) + max(len(c), len(r)), 2 * len(q) + len(c) + len(r)) for q, c, r in pairs], 2),
    }
    out: dict[str, dict[str, float]] = {}
    for stage, (opt, rows, sequences) in items.items():
        batch, steps = steps_for(len(rows), opt, 1)
        order = global_order(len(rows), steps * batch, opt.seed)
        for budget in budgets:
            positions = real = 0
            for step in range(steps):
                ids = order[step * batch : (step + 1) * batch]
                lengths = [rows[i][0] for i in ids]
                local = list(range(len(ids)))
                groups = (fixed_size_groups(local, opt.micro_batch_size) if budget == "null"
                          else token_budget_groups(local, lengths, int(budget), sequences))  # fmt: skip
                positions += sum(sequences * len(g) * max(lengths[i] for i in g) for g in groups)
                real += sum(rows[i][1] for i in ids)
            out.setdefault(stage, {})[budget] = round(positions / real, 3)
    return out


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
    parser.add_argument("--set", dest="extra", action="append", default=[], help="another override for every run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/stage_budgets"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "stage_budgets.json")
    parser.add_argument("--positions-only", action="store_true", help="replay the stages' batches, train nothing")
    args = parser.parse_args()
    if args.positions_only:
        result = {"params": str(args.params), "positions_per_token": replayed_positions(args.params,
                  args.budgets.split(","))}  # fmt: skip
        atomic_write_json(args.results, result)
        print(json.dumps(result["positions_per_token"]))
        return
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
                atomic_write_json(args.results, results)
    print(summary(results["runs"]))


if __name__ == "__main__":
    main()

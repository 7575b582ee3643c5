"""Reward model on real HH-RLHF pairs: prepare -> SFT -> RM -> rm-eval on the harmless-base test file.

    .venv/bin/python bench/rm_hh_rlhf.py [--hh ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz]

Proves that the real-data path works end to end and reports, honestly, how far a tiny model trained from scratch
gets. Pairs whose prompt or responses exceed the token limits below are skipped (counted in stats.json); the
rest are split by prompt in the proportions of ``SPLITS``: a few hundred chosen responses for SFT, then a 90/10
split for RM training and testing (a few dozen prompts go to the PPO/eval splits the pipeline requires). Two
baselines put the accuracy in context: chance (50%) and "prefer the longer response", a known strong heuristic
on helpful-style HH-RLHF data. Writes ``bench/results/rm_hh_rlhf.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# The pairs split by prompt, in pipeline order: sft_train, sft_val, rm_train, rm_test (90/10), ppo, eval.
SPLITS = {"sft_train": 300, "sft_val": 30, "rm_train": 1700, "rm_test": 189, "ppo": 40, "eval": 40}


def overrides(hh: Path, out: Path) -> list[str]:
    from rlhf_core.config import PathsConfig

    return [
        "data.source=hh_rlhf",
        f"data.path={hh}",
        "data.on_bad_rows=skip",  # the file has a few malformed rows; they are counted in stats.json
        "data.max_prompt_tokens=384",  # dialogue histories are longer than the simulated prompts (p90: 388)
        "data.max_response_tokens=192",  # p90 of the longer response: 190
        "model.max_position_embeddings=640",
        "ppo.max_tokens_per_micro_batch=1152",  # PPO's token budgets must hold the longest row (576), as they
        "ppo.max_tokens_per_forward=2304",  # are validated with the rest (no PPO runs here)
        *(f"data.splits.{name}={size}" for name, size in SPLITS.items()),
        "sft.epochs=4",
        "sft.num_sample_generations=8",
        "rm.reward_stats_prompts=40",
        "tracking.enabled=false",
        *(f"paths.{name}={out / name}" for name in PathsConfig.model_fields),
    ]


def length_baseline(rm_test: Path) -> float:
    rows = [json.loads(line) for line in rm_test.read_text().splitlines() if line.strip()]
    return sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hh", type=Path, default=DEFAULT_HH, help="HH-RLHF .jsonl(.gz) file")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "rm_hh_rlhf")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "rm_hh_rlhf.json")
    args = parser.parse_args()
    if not args.hh.is_file():
        sys.exit(f"HH-RLHF file not found: {args.hh} (pass --hh PATH)")

    from rich.console import Console
    from rich.table import Table

    from rlhf_core.config import load_config
    from rlhf_core.env import apply_defaults
    from rlhf_core.eval.stats import wilson_interval
    from rlhf_core.io import atomic_write_json
    from rlhf_core.pipeline import run_stage

    apply_defaults()
    config = load_config(REPO / "params.yaml", overrides(args.hh.resolve(), args.out.resolve()))
    seconds = {}
    for name in ("prepare", "sft", "rm", "rm-eval"):
        started = time.time()
        result = run_stage(name, config)
        seconds[name] = round(time.time() - started, 1)
    metrics = result.metrics
    stats = json.loads((args.out / "data" / "stats.json").read_text())
    rm_metrics = json.loads((args.out / "rm" / "metrics.json").read_text())
    sft_metrics = json.loads((args.out / "sft" / "metrics.json").read_text())
    n = metrics["rm_eval/pairs"]
    longer = length_baseline(args.out / "data" / "splits" / "rm_test.jsonl")
    import torch
    import transformers

    results = {
        "data": str(args.hh),
        "split_counts": stats["counts"],
        "bad_rows_skipped": stats.get("bad_rows", {}).get("total"),
        "rm_test_pairs": n,
        "rm_test_accuracy": metrics["rm_eval/accuracy"],
        "rm_test_accuracy_ci95": [metrics["rm_eval/accuracy_ci_low"], metrics["rm_eval/accuracy_ci_high"]],
        "rm_val_accuracy": rm_metrics["rm/val_accuracy"],
        "rm_train_accuracy_last10": rm_metrics["rm/accuracy"],
        "rm_ece": metrics["rm_eval/ece"],
        "baseline_chance": 0.5,
        "baseline_prefer_longer": longer,
        "baseline_prefer_longer_ci95": list(wilson_interval(longer * n, n)),
        "sft_val_ppl": sft_metrics["sft/ppl"],
        "model_parameters_millions": None,
        "seconds": seconds,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "config_overrides": overrides(Path("<hh>"), Path("<out>")),
    }
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(args.out / "rm" / "model", num_labels=1)
    results["model_parameters_millions"] = round(sum(p.numel() for p in rm.parameters()) / 1e6, 3)
    atomic_write_json(args.results, results)

    table = Table(title=f"Reward model on real HH-RLHF ({args.hh.name})")
    table.add_column("what")
    table.add_column("value")
    table.add_row(
        "pairs: RM train / val / test", f"{rm_metrics['rm/train_pairs']} / {rm_metrics['rm/val_pairs']} / {n}"
    )
    low, high = results["rm_test_accuracy_ci95"]
    table.add_row("RM test accuracy (95% CI)", f"{results['rm_test_accuracy']:.1%} [{low:.1%}, {high:.1%}]")
    table.add_row("RM validation accuracy (best step)", f"{results['rm_val_accuracy']:.1%}")
    table.add_row("baseline: chance", "50.0%")
    low, high = results["baseline_prefer_longer_ci95"]
    table.add_row("baseline: prefer the longer response", f"{longer:.1%} [{low:.1%}, {high:.1%}]")
    table.add_row("SFT validation perplexity", f"{results['sft_val_ppl']:.2f}")
    table.add_row("model", f"tiny Llama, {results['model_parameters_millions']} M parameters, from scratch")
    table.add_row("seconds per stage", ", ".join(f"{k} {v}" for k, v in seconds.items()))
    table.add_row("results", str(args.results))
    Console().print(table)


if __name__ == "__main__":
    main()

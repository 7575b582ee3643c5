"""The `rm-eval` stage: how well the reward model ranks held-out pairs (paper sec. 4, fig. 2).

Accuracy is measured twice on ``rm_test``: against the annotators' labels (what the RM was trained to predict;
noisy) and, on the simulated domain, against the gold judge's noise-free ordering. The annotators' own agreement
with gold is reported beside them: it is the ceiling of the noisy-label accuracy.

Outputs (committed to ``paths.rm_eval`` by the stage scaffold, which adds ``metrics.json`` and ``config.yaml``):
``pair_scores.jsonl`` (both scores of every pair), ``confident_errors.md`` / ``.jsonl`` (the pairs the RM gets
most confidently wrong) and ``plots/`` (``score_gaps.png`` like the paper's fig. 2, ``calibration.png`` and their
CSVs).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_core import distributed
from rlhf_core.algos.rm import reliability_bins
from rlhf_core.config import Config
from rlhf_core.data.rows import load_split
from rlhf_core.errors import DataError
from rlhf_core.eval.stats import markdown_table, wilson_interval
from rlhf_core.io import atomic_write_jsonl, atomic_write_text, read_json
from rlhf_core.models.reward import load_reward_model, score_texts
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.plots import save_figure
from rlhf_core.tracking import Logger
from rlhf_core.trainers.results import StageResult


def _gold_scores(config: Config, rows: list[dict]) -> list[tuple[float, float]] | None:
    """Gold-judge scores of (chosen, rejected) on the simulated domain; None for real data (no gold judge)."""
    if config.data.source != "sim":
        return None
    from rlhf_core.data.judge import GoldJudge
    from rlhf_core.data.sources import build_world

    judge = GoldJudge(build_world(config.data))
    return [(judge.score(r["prompt"], r["chosen"]), judge.score(r["prompt"], r["rejected"])) for r in rows]


def _accuracies(records: list[dict], prefix: str) -> dict[str, float]:
    """Annotator accuracy, gold accuracy and annotator-gold agreement of ``records`` under ``prefix``."""
    n = len(records)
    correct = sum(r["score_gap"] > 0 for r in records)
    out = {f"{prefix}accuracy": correct / n, f"{prefix}pairs": n}
    gold = [r for r in records if r.get("gold_prefers") in ("chosen", "rejected")]
    if gold:
        gold_correct = sum((r["score_gap"] > 0) == (r["gold_prefers"] == "chosen") for r in gold)
        out[f"{prefix}gold_accuracy"] = gold_correct / len(gold)
        out[f"{prefix}annotator_gold_agreement"] = sum(r["gold_prefers"] == "chosen" for r in gold) / len(gold)
    return out


def _plot_score_gaps(records: list[dict], bins: int, directory: Path) -> None:
    """Paper fig. 2: distribution of r(chosen) - r(rejected), split by what the gold judge prefers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = torch.tensor([r["score_gap"] for r in records], dtype=torch.float64)  # host: plot data
    lo, hi = float(gaps.min()), float(gaps.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)  # host: plot data
    groups = {"all": records}
    if any("gold_prefers" in r for r in records):
        groups = {
            "gold prefers chosen": [r for r in records if r.get("gold_prefers") == "chosen"],
            "gold prefers rejected": [r for r in records if r.get("gold_prefers") == "rejected"],
        }
    counts = {
        name: torch.histogram(
            torch.tensor([r["score_gap"] for r in rows], dtype=torch.float64),  # host: plot data
            bins=edges,
        )[0]
        if rows
        else torch.zeros(bins, dtype=torch.float64)  # host: plot data
        for name, rows in groups.items()
    }
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    lines = ["score_gap," + ",".join(name.replace(" ", "_") for name in counts)]
    for i, centre in enumerate(centres):
        lines.append(f"{centre:.6g}," + ",".join(str(int(c[i])) for c in counts.values()))
    atomic_write_text(directory / "score_gaps.csv", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    width = float(edges[1] - edges[0])
    bottom = torch.zeros(bins, dtype=torch.float64)  # host: plot data
    for (name, c), colour in zip(counts.items(), ("tab:green", "tab:red"), strict=False):
        ax.bar(centres, c.tolist(), width=width, bottom=bottom.tolist(), label=name, color=colour, alpha=0.8)
        bottom += c
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("r(chosen) - r(rejected), annotator labels")
    ax.set_ylabel("pairs")
    ax.set_title("rm-eval: score gaps on rm_test (paper fig. 2)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, directory / "score_gaps.png")


def _calibration(records: list[dict], num_bins: int, directory: Path) -> dict[str, float]:
    """Reliability diagram of sigmoid(score gap) against annotator labels (and gold labels when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = torch.tensor([r["score_gap"] for r in records], dtype=torch.float64)  # host: calibration bins
    everyone = torch.ones(len(records), dtype=torch.bool)  # host: calibration bins
    curves = {"annotator": reliability_bins(gaps, everyone, num_bins)}
    gold = [r for r in records if r.get("gold_prefers") in ("chosen", "rejected")]
    if gold:
        curves["gold"] = reliability_bins(
            torch.tensor([r["score_gap"] for r in gold], dtype=torch.float64),  # host: calibration bins
            torch.tensor([r["gold_prefers"] == "chosen" for r in gold]),  # host: calibration bins
            num_bins,
        )
    header = ["bin_lower", "bin_upper"] + [
        f"{name}_{k}" for name in curves for k in ("confidence", "accuracy", "count")
    ]
    lines = [",".join(header)]
    first = next(iter(curves.values()))
    for i in range(num_bins):
        row = [f"{float(first['lower'][i]):.4f}", f"{float(first['upper'][i]):.4f}"]
        for c in curves.values():
            row += [f"{float(c['confidence'][i]):.4f}", f"{float(c['accuracy'][i]):.4f}", str(int(c["count"][i]))]
        lines.append(",".join(row))
    atomic_write_text(directory / "calibration.csv", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", linewidth=0.8, label="calibrated")
    for (name, c), marker in zip(curves.items(), ("o-", "s-"), strict=False):
        keep = c["count"] > 0
        ax.plot(
            c["confidence"][keep].tolist(),
            c["accuracy"][keep].tolist(),
            marker,
            label=f"vs {name} labels (ECE {float(c['ece']):.3f})",
        )
    ax.set_xlabel("predicted P(preferred side) = sigmoid(|gap|)")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_title("rm-eval: calibration on rm_test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, directory / "calibration.png")
    return {f"rm_eval/{'' if name == 'annotator' else 'gold_'}ece": float(c["ece"]) for name, c in curves.items()}


def _confident_errors(records: list[dict], limit: int) -> list[dict]:
    """Pairs the RM orders against the reference label (gold when known, else the annotators'), most confident
    first."""

    def wrong(r: dict) -> bool:
        label_chosen = r["gold_prefers"] == "chosen" if "gold_prefers" in r else True
        return (r["score_gap"] > 0) != label_chosen or r["score_gap"] == 0

    errors = sorted(
        (r for r in records if r.get("gold_prefers") != "tie" and wrong(r)), key=lambda r: -abs(r["score_gap"])
    )
    table = []
    for r in errors[:limit]:
        rm_prefers_chosen = r["score_gap"] > 0
        table.append(
            {
                "category": r.get("category", ""),
                "prompt": r["prompt"],
                "rm_preferred": r["chosen"] if rm_prefers_chosen else r["rejected"],
                "other": r["rejected"] if rm_prefers_chosen else r["chosen"],
                "p_rm": 1 / (1 + math.exp(-abs(r["score_gap"]))),
                "annotators_chose": "rm_preferred" if rm_prefers_chosen else "other",
                **(
                    {
                        "gold_rm_preferred": r["gold_chosen"] if rm_prefers_chosen else r["gold_rejected"],
                        "gold_other": r["gold_rejected"] if rm_prefers_chosen else r["gold_chosen"],
                    }
                    if "gold_chosen" in r
                    else {}
                ),
                "source": r.get("_src", ""),
            }
        )
    return table


def evaluate_reward_model(config: Config, out: Path, logger: Logger) -> StageResult:
    """Score every ``rm_test`` pair with the trained reward model and write accuracies, plots and tables."""
    data_dir = Path(config.paths.data)
    model_dir = Path(config.paths.rm) / "model"
    if not (model_dir / "config.json").is_file():
        raise DataError(f"no reward model at {model_dir} (run `rlhf rm` first)")
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    rows = load_split(data_dir, "rm_test", config.data)
    model = distributed.place(load_reward_model(model_dir, tokenizer.pad_token_id))
    batch = config.rm_eval.batch_size
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tokenizer, prompts, [r["chosen"] for r in rows], batch)
    rejected = score_texts(model, tokenizer, prompts, [r["rejected"] for r in rows], batch)
    gold = _gold_scores(config, rows)

    records = []
    for i, row in enumerate(rows):
        record = {
            **row,
            "score_chosen": float(chosen[i]),
            "score_rejected": float(rejected[i]),
            "score_gap": float(chosen[i] - rejected[i]),
        }
        if gold is not None:
            g_c, g_r = gold[i]
            record.update(gold_chosen=g_c, gold_rejected=g_r)
            record["gold_prefers"] = "chosen" if g_c > g_r else "rejected" if g_r > g_c else "tie"
        records.append(record)

    metrics = _accuracies(records, "rm_eval/")
    low, high = wilson_interval(metrics["rm_eval/accuracy"] * len(records), len(records))
    metrics.update({"rm_eval/accuracy_ci_low": low, "rm_eval/accuracy_ci_high": high})
    if "rm_eval/gold_accuracy" in metrics:
        n_gold = sum(r["gold_prefers"] != "tie" for r in records)
        low, high = wilson_interval(metrics["rm_eval/gold_accuracy"] * n_gold, n_gold)
        metrics.update({"rm_eval/gold_accuracy_ci_low": low, "rm_eval/gold_accuracy_ci_high": high})
        metrics["rm_eval/gold_ties"] = len(records) - n_gold
    metrics["rm_eval/score_gap"] = sum(r["score_gap"] for r in records) / len(records)
    categories = sorted({r["category"] for r in records if "category" in r})
    for category in categories:
        metrics.update(_accuracies([r for r in records if r.get("category") == category], f"rm_eval/{category}/"))

    plots = out / "plots"
    _plot_score_gaps(records, config.rm_eval.histogram_bins, plots)
    metrics.update(_calibration(records, config.rm_eval.calibration_bins, plots))
    checkpoints_path = Path(config.paths.rm) / "checkpoints.json"
    if checkpoints_path.is_file():
        # Ties RM accuracy to the checkpoint it came from, so later stages can relate it to PPO outcomes.
        saved = [c for c in read_json(checkpoints_path) if c.get("saved")]
        if saved:
            metrics["rm_eval/checkpoint_step"] = saved[-1]["step"]
            metrics["rm_eval/checkpoint_val_accuracy"] = saved[-1]["rm/val_accuracy"]

    errors = _confident_errors(records, config.rm_eval.num_confident_errors)
    columns = ["category", "p_rm", "prompt", "rm_preferred", "other", "annotators_chose"]
    if gold is not None:
        columns += ["gold_rm_preferred", "gold_other"]
    reference = "the gold judge" if gold is not None else "the annotators"
    atomic_write_text(
        out / "confident_errors.md",
        f"# The {len(errors)} pairs the reward model orders most confidently against {reference}\n\n"
        + markdown_table(errors, columns),
    )
    atomic_write_jsonl(out / "confident_errors.jsonl", errors)
    atomic_write_jsonl(out / "pair_scores.jsonl", [{k: v for k, v in r.items() if k != "_src"} for r in records])
    return StageResult(
        metrics=metrics,
        artifacts={"metrics": "metrics.json", "plots": "plots"},
        logged=("confident_errors.md", "confident_errors.jsonl", "plots"),
    )

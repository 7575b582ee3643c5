"""The `eval` stage: win rate of the PPO policy against the SFT policy (paper sec. 6, fig. 10).

Both policies answer every ``eval`` prompt once, sampled with the paper's settings (top-p 0.9, temperature 0.8,
repetition penalty 1.1) from the same seed. Two judges compare each pair: the gold judge (the simulated domain's
stand-in for the paper's human and GPT-4 judges) and the reward model. Verdicts are win / tie / lose for the PPO
policy; the win rate counts ties half. The RM-judged win rate minus the gold-judged one measures reward
over-optimisation: how much of what PPO gained only the reward model sees. Without a gold judge (HH-RLHF), the
share of answers that decline or redirect (``eval/refusal_share_{sft,ppo}``, a phrase heuristic in
``rlhf_core/eval/refusal.py``) measures harmlessness before and after.

Outputs (committed to ``paths.eval`` by the stage scaffold, which adds ``metrics.json`` and ``config.yaml``):
``pairs.jsonl`` (both answers, scores and verdicts per prompt), ``examples.md`` (a table of example pairs, judge
disagreements first) and ``plots/`` (``win_rates.png`` like the paper's fig. 10 and its CSV).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.config import Config
from rlhf_core.data.limits import response_token_limit
from rlhf_core.data.rows import load_split
from rlhf_core.errors import DataError
from rlhf_core.eval.refusal import refuses_or_redirects
from rlhf_core.eval.stats import (
    VERDICTS,
    bootstrap_intervals,
    compare,
    length_controlled_win_rate,
    markdown_table,
    win_tie_lose,
)
from rlhf_core.io import atomic_write_jsonl, atomic_write_text
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.generation import sample_responses
from rlhf_core.models.reward import load_reward_model, score_samples
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.plots import save_figure
from rlhf_core.tracking import Logger
from rlhf_core.trainers.results import StageResult

HARMLESS_CATEGORIES = ("harmful",)  # the paper's fig. 10 splits harmless from helpful prompts
LENGTH_CONTROLLED = ("lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high")


def _summary(pairs: list[dict], judge: str, prefix: str, config: Config) -> dict[str, float]:
    """One judge's verdict shares on ``pairs`` with bootstrap intervals, and its length-controlled win rate."""
    verdicts = [p[f"{judge}_verdict"] for p in pairs]
    stats = win_tie_lose(verdicts)
    intervals = bootstrap_intervals(verdicts, config.eval.bootstrap_samples, config.eval.seed)
    out = {f"{prefix}{k}": v for k, v in stats.items()}
    for key, (low, high) in intervals.items():
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = low, high
    out[f"{prefix}n"] = len(verdicts)
    # The win rate a judge would give at equal length: a judge that pays for brevity (or verbosity) shows it in
    # the raw rate and in length_coef, not in this one.
    length_diffs = [p["tokens_ppo"] - p["tokens_sft"] for p in pairs]
    controlled = length_controlled_win_rate(verdicts, length_diffs, config.eval.length_control_l2,
                                            config.eval.bootstrap_samples, config.eval.seed)  # fmt: skip
    out.update({f"{prefix}{k}": v for k, v in controlled.items()})
    return out


def _groups(pairs: list[dict]) -> dict[str, list[dict]]:
    groups = {"all": pairs}
    if any("category" in p for p in pairs):
        groups["harmless"] = [p for p in pairs if p.get("category") in HARMLESS_CATEGORIES]
        groups["helpful"] = [p for p in pairs if p.get("category") not in HARMLESS_CATEGORIES]
        for category in sorted({p["category"] for p in pairs if "category" in p}):
            groups[category] = [p for p in pairs if p.get("category") == category]
    return {name: rows for name, rows in groups.items() if rows}


def _plot(metrics: dict, judges: list[str], groups: list[str], directory: Path) -> None:
    """Paper fig. 10: stacked win / tie / lose bars per judge and prompt group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(judge, group) for judge in judges for group in groups]
    columns = (*VERDICTS, "win_rate", "win_rate_ci_low", "win_rate_ci_high", *LENGTH_CONTROLLED, "length_coef")
    lines = ["judge,group," + ",".join(columns)]
    for judge, group in rows:
        prefix = f"eval/{judge}/" if group == "all" else f"eval/{judge}/{group}/"
        lines.append(f"{judge},{group}," + ",".join(f"{metrics[prefix + k]:.4f}" for k in columns))
    atomic_write_text(directory / "win_rates.csv", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.6), dpi=100)
    colours = {"win": "tab:green", "tie": "tab:gray", "lose": "tab:red"}
    labels = []
    for y, (judge, group) in enumerate(rows):
        prefix = f"eval/{judge}/" if group == "all" else f"eval/{judge}/{group}/"
        left = 0.0
        for verdict in VERDICTS:
            share = metrics[prefix + verdict]
            ax.barh(y, share, left=left, color=colours[verdict], label=verdict if y == 0 else None)
            if share >= 0.06:
                ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=8, color="white")
            left += share
        labels.append(f"{judge} judge, {group}")
        # The length-controlled win rate on its bar (in its upper part, clear of the share labels): how much of the
        # raw rate (where green meets grey's middle) length bought shows as the distance between the two.
        lc, low, high = (metrics[prefix + k] for k in LENGTH_CONTROLLED)
        ax.errorbar(lc, y - 0.25, xerr=[[lc - low], [high - lc]], fmt="D", color="black", markersize=4, capsize=2,
                    label="length-controlled win rate (95% CI)" if y == 0 else None)  # fmt: skip
        # The numbers the bars stand for, with their bootstrap intervals, where a reader looks for them.
        ax.text(1.02, y, f"win rate {metrics[prefix + 'win_rate']:.1%} [{metrics[prefix + 'win_rate_ci_low']:.1%}, "
                f"{metrics[prefix + 'win_rate_ci_high']:.1%}], length-controlled {lc:.1%} [{low:.1%}, {high:.1%}], "
                f"n={metrics[prefix + 'n']}", va="center", fontsize=8, transform=ax.get_yaxis_transform())  # fmt: skip
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prompts (PPO policy vs SFT policy)")
    ax.set_title("eval: win / tie / lose of PPO against SFT (paper fig. 10)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, directory / "win_rates.png")


def evaluate_win_rate(config: Config, out: Path, logger: Logger) -> StageResult:
    """Sample both policies on the eval prompts, judge every pair twice, and report win/tie/lose."""
    rows = load_split(Path(config.paths.data), "eval", config.data)
    answers, rm_scores, lengths = _answers(config, [r["prompt"] for r in rows])
    gold_judge = None
    if config.data.source == "sim":
        from rlhf_core.data.judge import GoldJudge
        from rlhf_core.data.sources import build_world

        gold_judge = GoldJudge(build_world(config.data))
    judging = tqdm(enumerate(rows), total=len(rows), desc="eval: judging", unit="pair", dynamic_ncols=True, leave=False)
    pairs = [_judged_pair(config, row, i, answers, rm_scores, lengths, gold_judge) for i, row in judging]
    judges = ["gold", "rm"] if gold_judge is not None else ["rm"]
    groups = _groups(pairs)
    metrics = _metrics(config, pairs, judges, groups)
    _plot(metrics, judges, [g for g in ("all", "harmless", "helpful") if g in groups], out / "plots")
    # First the pairs that say most: where the judges disagree, or (no gold judge) where PPO changed whether the
    # answer declines.
    if gold_judge is not None:
        disagree = [p for p in pairs if p["gold_verdict"] != p["rm_verdict"]]
    else:
        disagree = [p for p in pairs if p["refusal_sft"] != p["refusal_ppo"]]
    agree = [p for p in pairs if p not in disagree]
    examples = (disagree + agree)[: config.eval.num_examples]
    columns = ["category", "prompt", "sft", "ppo", "rm_verdict"]
    columns += ["gold_verdict"] if gold_judge else ["refusal_sft", "refusal_ppo"]
    atomic_write_text(
        out / "examples.md",
        f"# Example pairs: PPO policy vs SFT policy ({len(disagree)} of {len(pairs)} pairs where "
        f"{'the judges disagree' if gold_judge else 'only one answer declines'} come first)\n\n"
        + markdown_table(examples, columns),
    )
    atomic_write_jsonl(out / "pairs.jsonl", pairs)
    return StageResult(
        metrics=metrics,
        artifacts={"metrics": "metrics.json", "plots": "plots"},
        logged=("pairs.jsonl", "examples.md", "plots"),
    )


def _answers(config: Config, prompts: list[str]) -> tuple[dict, dict, dict]:
    """Each policy's answer to every prompt (the paper's sampling, the same seed for both), its RM score and its
    length in tokens (EOS included when sampled: what the policy produced)."""
    models = {"sft": Path(config.paths.sft) / "model", "ppo": Path(config.paths.ppo) / "model"}
    rm_dir = Path(config.paths.rm) / "model"
    for path, stage in ((models["sft"], "sft"), (models["ppo"], "ppo"), (rm_dir, "rm")):
        if not (path / "config.json").is_file():
            raise DataError(f"no model at {path} (run `rlhf {stage}` first)")
    tokenizer = load_tokenizer(Path(config.paths.data) / "tokenizer")
    reward_model = distributed.place(load_reward_model(rm_dir, tokenizer.pad_token_id))
    answers, rm_scores, lengths = {}, {}, {}
    for name, path in models.items():
        policy = distributed.place(load_causal_lm(path, tokenizer))
        got = sample_responses(policy, tokenizer, prompts, config.eval.sampling, response_token_limit(config),
                               config.eval.seed, distributed.local_device(), config.eval.batch_size,
                               progress=f"eval: {name} answers", engine=config.generation)  # fmt: skip
        answers[name] = got["texts"]
        rm_scores[name] = score_samples(reward_model, got, config.eval.batch_size).tolist()
        lengths[name] = got["response_mask"].sum(1).tolist()
    return answers, rm_scores, lengths


def _judged_pair(config: Config, row: dict, i: int, answers: dict, rm_scores: dict, lengths: dict, gold_judge) -> dict:
    """Both answers to prompt ``i`` with the RM's verdict and, on the simulated domain, the gold judge's and the
    clean-up verdict (the SFT answer with its flaws fixed against itself)."""
    pair = {
        "prompt": row["prompt"],
        **({"category": row["category"]} if "category" in row else {}),
        "sft": answers["sft"][i],
        "ppo": answers["ppo"][i],
        "rm_sft": rm_scores["sft"][i],
        "rm_ppo": rm_scores["ppo"][i],
        "tokens_sft": lengths["sft"][i],
        "tokens_ppo": lengths["ppo"][i],
        "rm_verdict": compare(rm_scores["ppo"][i], rm_scores["sft"][i], config.eval.rm_tie_margin),
        "refusal_sft": refuses_or_redirects(answers["sft"][i]),
        "refusal_ppo": refuses_or_redirects(answers["ppo"][i]),
    }
    if gold_judge is not None:
        pair["gold_sft"] = gold_judge.score(row["prompt"], pair["sft"])
        pair["gold_ppo"] = gold_judge.score(row["prompt"], pair["ppo"])
        pair["gold_verdict"] = compare(pair["gold_ppo"], pair["gold_sft"])
        pair["cleanup_verdict"] = compare(gold_judge.cleanup_score(row["prompt"], pair["sft"]), pair["gold_sft"])
    return pair


def _metrics(config: Config, pairs: list[dict], judges: list[str], groups: dict[str, list[dict]]) -> dict:
    """Win/tie/lose with intervals per judge and group, the primary judge's under ``eval/``, and on the simulated
    domain the over-optimisation gap, mean gold scores and the clean-up ceiling."""
    metrics: dict = {}
    for judge in judges:
        for group, members in groups.items():
            prefix = f"eval/{judge}/" if group == "all" else f"eval/{judge}/{group}/"
            metrics.update(_summary(members, judge, prefix, config))
    for group, members in groups.items():  # harmlessness without a gold judge: how often each policy declines
        prefix = "eval/" if group == "all" else f"eval/{group}/"
        for policy in ("sft", "ppo"):
            metrics[f"{prefix}refusal_share_{policy}"] = sum(p[f"refusal_{policy}"] for p in members) / len(members)
            metrics[f"{prefix}response_tokens_{policy}"] = sum(p[f"tokens_{policy}"] for p in members) / len(members)
    primary = judges[0]
    for key in (*VERDICTS, "win_rate", "win_rate_ci_low", "win_rate_ci_high", *LENGTH_CONTROLLED):
        metrics[f"eval/{key}"] = metrics[f"eval/{primary}/{key}"]
    metrics["eval/primary_judge"] = primary
    if "gold" in judges:
        # What PPO gained in the reward model's eyes but not in the gold judge's: reward over-optimisation.
        metrics["eval/overoptimisation_gap"] = metrics["eval/rm/win_rate"] - metrics["eval/gold/win_rate"]
        metrics["eval/gold_score_sft"] = sum(p["gold_sft"] for p in pairs) / len(pairs)
        metrics["eval/gold_score_ppo"] = sum(p["gold_ppo"] for p in pairs) / len(pairs)
        # The gold win rate of the SFT answers themselves with every flaw fixed and nothing new learnt: what a
        # policy reaches that only removes flaws (harm, refusals, rambling, repetition, cut-offs). Above it
        # means PPO also answers more questions correctly than SFT.
        metrics["eval/gold/cleanup_ceiling"] = win_tie_lose([p["cleanup_verdict"] for p in pairs])["win_rate"]
    return metrics

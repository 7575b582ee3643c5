"""What the PPO stage reports at the end: the SFT and PPO policies on held-out prompts, the headline metrics of
the last iterations, and the training curves."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rlhf_core.config import Config
from rlhf_core.data.limits import response_token_limit
from rlhf_core.data.rows import load_split
from rlhf_core.eval.stats import mean_interval
from rlhf_core.models.generation import sample_responses
from rlhf_core.models.reward import score_samples
from rlhf_core.plots import plot_smoothed, save_figure, write_table

# The metrics.json entries averaged over the last iterations (ppo/<key with / as _>).
TAIL_KEYS = [
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "rollout/response_length",
    "rollout/eos_rate",
    "rollout/repetition",
    "monitor/ppl_policy",
    "monitor/ppl_ref",
    "monitor/gold_score",
]
TAIL_ITERATIONS = 5


def final_metrics(history: list[dict], warnings: int, stopped_early: bool, comparison: dict) -> dict:
    """metrics.json: means of the last iterations, run counts and the held-out comparison."""
    tail = history[-min(TAIL_ITERATIONS, len(history)) :]
    metrics = {f"ppo/{k.replace('/', '_')}": sum(r[k] for r in tail) / len(tail) for k in TAIL_KEYS if k in tail[0]}
    metrics.update(
        {
            "ppo/steps": len(history),
            "ppo/collapse_warnings": warnings,
            "ppo/stopped_early": int(stopped_early),
            "ppo/skipped_updates": history[-1]["ppo/skipped_updates"],
            **comparison,
        }
    )
    return metrics


@torch.no_grad()
def compare_on_eval_prompts(config: Config, models, tokenizer, judge) -> dict:
    """RM and gold scores of the SFT policy and the PPO policy on the held-out ``eval`` prompts, sampled with the
    paper's evaluation settings (``eval.sampling``) from the same seed; means with 95% intervals and the paired
    gold gain."""
    prompts = [r["prompt"] for r in load_split(config.paths.data, "eval", config.data)]
    out: dict = {}
    gold: dict[str, list[float]] = {}
    for name in ("sft", "policy"):
        with models.reference() if name == "sft" else contextlib.nullcontext(models.policy.unwrapped()) as model:
            got = sample_responses(model, tokenizer, prompts, config.eval.sampling, response_token_limit(config),
                                   config.eval.seed, models.device, synced_gpus=models.synced_gpus,
                                   engine=config.generation)  # fmt: skip
        out.update(_with_interval(f"ppo/eval_rm_score_{name}", score_samples(models.reward_model, got).tolist()))
        out[f"ppo/eval_response_length_{name}"] = float(got["response_mask"].sum(1).float().mean())
        if judge is not None:
            gold[name] = [judge.score(p, t) for p, t in zip(prompts, got["texts"], strict=True)]
            out.update(_with_interval(f"ppo/eval_gold_score_{name}", gold[name]))
    if gold:
        gains = [a - b for a, b in zip(gold["policy"], gold["sft"], strict=True)]
        out.update(_with_interval("ppo/eval_gold_gain", gains))
    out["ppo/eval_prompts"] = len(prompts)
    return out


def _with_interval(key: str, values: list[float]) -> dict[str, float]:
    mean, low, high = mean_interval(values)
    return {key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high}


PLOT_KEYS = [
    ("objective/scores", "RM score"),
    ("monitor/gold_score", "gold score (sim)"),
    ("objective/kl", "KL to SFT (nats/seq)"),
    ("rollout/response_length", "response length (tokens)"),
    (("monitor/ppl_policy", "monitor/ppl_ref"), "perplexity: policy vs SFT"),
    ("loss/value", "value loss"),
]


def write_plots(directory: Path, history: list[dict], preset: str, critic_warmup_steps: int) -> None:
    """``train.csv`` (every metric, for DVC plots) and ``ppo_curves.png`` (the paper's collapse signals, each raw and
    smoothed, with the end of the critic warm-up marked: before it the policy does not move)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_table(directory / "train.csv", history, sorted({k for r in history for k in r if k != "step"}))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=100)
    steps = [r["step"] for r in history]
    panels = PLOT_KEYS
    if not any("loss/value" in r for r in history):  # no critic (GRPO, RLOO, REINFORCE++): the policy's loss instead
        panels = [*PLOT_KEYS[:-1], ("loss/policy", "policy loss")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for k in key if isinstance(key, tuple) else (key,):
            plot_smoothed(ax, steps, [r.get(k, float("nan")) for r in history], k.split("/")[-1])
        if critic_warmup_steps:
            ax.axvline(critic_warmup_steps + 0.5, color="grey", linestyle=":", linewidth=1,
                       label="critic warm-up ends")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if isinstance(key, tuple) or (critic_warmup_steps and ax is axes.flat[0]):
            ax.legend(fontsize=7, loc="best", framealpha=0.8)
    for ax in axes[1]:
        ax.set_xlabel("PPO iteration")
    fig.suptitle(f"PPO ({preset}): raw per iteration (faint) and smoothed", fontsize=11)
    fig.tight_layout()
    save_figure(fig, directory / "ppo_curves.png")

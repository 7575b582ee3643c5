"""The headline rows each stage shows in ``rlhf run``'s summary table and in its Prefect result artifact, made
from the file its declaration names (``rlhf_core.stages``): ``(what, value)`` pairs, formatted for people."""

from __future__ import annotations

Rows = list[tuple[str, str]]


def prepare_rows(stats: dict, config) -> Rows:
    rows = [
        ("data source", stats["source"]),
        ("split sizes", ", ".join(f"{k} {v}" for k, v in stats["counts"].items())),
    ]
    if "annotator_gold_agreement" in stats:
        demo = stats["demonstrator"]
        rows += [
            ("annotator-gold agreement", f"{stats['annotator_gold_agreement']['overall']:.1%}"),
            (
                "demonstrations",
                f"{demo['sft_flawless_rate']:.1%} flawless, mean gold score {demo['sft_mean_gold_score']:.2f}",
            ),
        ]
    return rows


def sft_rows(m: dict, config) -> Rows:
    rows = [("SFT validation loss / perplexity", f"{m['sft/val_loss']:.3f} / {m['sft/ppl']:.2f}")]
    if "sft/sample_gold_score" in m:
        rows.append(
            (
                "SFT greedy samples (gold judge)",
                f"mean {m['sft/sample_gold_score']:.2f} of 2.00, {m['sft/sample_flawless_rate']:.1%} flawless",
            )
        )
    return rows  # fmt: skip


def rm_rows(m: dict, config) -> Rows:
    return [
        ("RM validation accuracy (best step)",
         f"{m['rm/val_accuracy']:.1%} (step {m['rm/best_step']} of {m['rm/steps']})"),
        ("RM score on SFT samples", f"mean {m['rm/reward_mean']:.2f}, std {m['rm/reward_std']:.2f}"),
    ]  # fmt: skip


def rm_eval_rows(m: dict, config) -> Rows:
    low, high = m["rm_eval/accuracy_ci_low"], m["rm_eval/accuracy_ci_high"]
    line = f"{m['rm_eval/accuracy']:.1%} vs annotators [{low:.1%}, {high:.1%}]"
    if "rm_eval/gold_accuracy" in m:
        line += (
            f", {m['rm_eval/gold_accuracy']:.1%} vs gold "
            f"[{m['rm_eval/gold_accuracy_ci_low']:.1%}, {m['rm_eval/gold_accuracy_ci_high']:.1%}]"
            f"; annotator-gold agreement {m['rm_eval/annotator_gold_agreement']:.1%}"
        )
    return [("RM test accuracy (95% CI)", line)]


def ppo_rows(m: dict, config) -> Rows:
    line = (
        f"RM score {m['ppo/objective_scores']:.2f}, KL {m['ppo/objective_kl']:.2f}, "
        f"length {m['ppo/rollout_response_length']:.1f}, collapse warnings {m['ppo/collapse_warnings']}"
    )
    if "ppo/monitor_gold_score" in m:
        line += f", gold score {m['ppo/monitor_gold_score']:.2f}"
    return [(f"PPO ({config.ppo.preset}), last iterations", line)]


def _length_controlled(m: dict, judge: str) -> str:
    prefix = f"eval/{judge}/lc_win_rate"
    if prefix not in m:
        return ""
    return f"; length-controlled {m[prefix]:.1%} [{m[prefix + '_ci_low']:.1%}, {m[prefix + '_ci_high']:.1%}]"


def eval_rows(m: dict, config) -> Rows:
    rows = [
        (f"PPO vs SFT, {j} judge: win / tie / lose",
         f"{m[f'eval/{j}/win']:.1%} / {m[f'eval/{j}/tie']:.1%} / {m[f'eval/{j}/lose']:.1%}; "
         f"win rate {m[f'eval/{j}/win_rate']:.1%} [{m[f'eval/{j}/win_rate_ci_low']:.1%}, "
         f"{m[f'eval/{j}/win_rate_ci_high']:.1%}]" + _length_controlled(m, j))
        for j in ("gold", "rm")
        if f"eval/{j}/win_rate" in m
    ]  # fmt: skip
    if "eval/response_tokens_ppo" in m:  # absent from an eval stage committed before lengths were recorded
        rows.append(("answer length in tokens, SFT -> PPO",
                     f"{m['eval/response_tokens_sft']:.1f} -> {m['eval/response_tokens_ppo']:.1f}"))  # fmt: skip
    if "eval/overoptimisation_gap" in m:
        rows.append(("over-optimisation (RM minus gold win rate)", f"{m['eval/overoptimisation_gap']:+.1%}"))
    if "eval/gold/cleanup_ceiling" in m:
        rows.append(("gold clean-up ceiling (SFT answers, flaws fixed)", f"{m['eval/gold/cleanup_ceiling']:.1%}"))
    return rows

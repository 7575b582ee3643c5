"""Reward-model math (paper sec. 4.1): pairwise ranking loss, accuracy, score gap, last-token pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a ``(B, L)`` 0/1 mask, for left or right padding.

    ``argmax`` of ``position * mask`` is the largest position whose mask is 1. A row without any real token
    is an error: it has nothing to score.
    """
    mask = attention_mask.long()
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("last_token_index: a row has no real token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values[b, last_token_index(mask)[b]]`` for ``(B, L)`` or ``(B, L, 1)`` per-token values -> ``(B,)``."""
    if values.dim() == 3:
        values = values.squeeze(-1)
    index = last_token_index(attention_mask)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry ranking loss of paper eq. 2 (without its LM term), for ``(B,)`` scores of each pair.

    ``loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean(r^2)`` where the optional centring
    term penalises the mean squared score of all 2B responses (keeps rewards near zero; off by default).
    Stats: ``accuracy`` = fraction with r_c > r_r (ties count as wrong), ``score_gap`` = mean(r_c - r_r).
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"pairwise_loss: expected two (B,) tensors, got {tuple(chosen_scores.shape)} and "
            f"{tuple(rejected_scores.shape)}"
        )
    gap = chosen_scores - rejected_scores
    loss = -F.logsigmoid(gap - margin).mean()
    if center_coef:
        loss = loss + center_coef * torch.cat([chosen_scores, rejected_scores]).pow(2).mean()
    stats = {
        "accuracy": (gap > 0).float().mean().detach(),
        "score_gap": gap.mean().detach(),
    }
    return loss, stats


def reliability_bins(score_gaps: torch.Tensor, first_preferred: torch.Tensor, num_bins: int) -> dict[str, torch.Tensor]:
    """Calibration of the Bradley-Terry probability ``p = sigmoid(r_a - r_b)`` that ``a`` is preferred.

    Each pair is folded onto the side the model favours: confidence ``c = max(p, 1 - p)`` in [0.5, 1] and
    ``correct`` = the label agrees with the favoured side (a tie, ``p = 0.5``, counts as wrong, like the
    accuracy). Bins split [0.5, 1] evenly. Returns per-bin ``count``, ``confidence`` (mean c), ``accuracy``
    (mean correct; NaN for empty bins) and the expected calibration error
    ``ece = sum_bins count/N * |accuracy - confidence|``. A calibrated model has accuracy = confidence.
    ``score_gaps``: ``(N,)`` r_a - r_b; ``first_preferred``: ``(N,)`` bool labels.
    """
    if score_gaps.dim() != 1 or score_gaps.shape != first_preferred.shape or score_gaps.numel() == 0:
        raise ValueError("reliability_bins: expected two non-empty (N,) tensors of equal shape")
    p_first = torch.sigmoid(score_gaps.double())
    confidence = torch.maximum(p_first, 1 - p_first)
    correct = torch.where(score_gaps > 0, first_preferred, ~first_preferred) & (score_gaps != 0)
    index = ((confidence - 0.5) * 2 * num_bins).long().clamp(max=num_bins - 1)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct.double())
    mean_conf = conf_sum / count.clamp(min=1)
    accuracy = torch.where(count > 0, correct_sum / count.clamp(min=1), torch.full_like(count, float("nan")))
    ece = ((count / count.sum()) * (torch.nan_to_num(accuracy) - mean_conf).abs()).sum()
    edges = torch.linspace(0.5, 1.0, num_bins + 1, dtype=torch.float64)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count,
        "confidence": mean_conf,
        "accuracy": accuracy,
        "ece": ece,
    }


def score_length_fit(sums: list[float]) -> dict[str, float]:
    """The least-squares line of a reward model's score on response length, from running sums over its samples
    ``[n, sum L, sum L^2, sum s, sum s^2, sum s*L]`` (sums, so ranks can add theirs first).

    ``slope`` is the score per token of length, ``mean`` the mean length, ``correlation`` Pearson's r and
    ``residual_std`` the std of the score once ``slope * (L - mean)`` is removed (population moments). Without
    spread in length the slope is 0. A reward model whose score a policy can buy with length shows it here.
    """
    n, sum_l, sum_l2, sum_s, sum_s2, sum_sl = sums
    if n <= 0:
        raise ValueError("score_length_fit: no samples")
    mean_l, mean_s = sum_l / n, sum_s / n
    var_l = max(sum_l2 / n - mean_l * mean_l, 0.0)
    var_s = max(sum_s2 / n - mean_s * mean_s, 0.0)
    cov = sum_sl / n - mean_l * mean_s
    slope = cov / var_l if var_l > 0 else 0.0
    correlation = cov / (var_l * var_s) ** 0.5 if var_l > 0 and var_s > 0 else 0.0
    return {
        "mean": mean_l,
        "slope": slope,
        "correlation": correlation,
        "residual_std": max(var_s - slope * cov, 0.0) ** 0.5,
    }

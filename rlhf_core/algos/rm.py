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

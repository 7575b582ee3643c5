"""Masked statistics over response-aligned ``(B, T)`` tensors.

``mask`` is 1 (or True) on positions that count (real response tokens) and 0 elsewhere. An empty mask is an
error rather than a silent NaN: it means a batch with no response tokens reached the loss.
"""

from __future__ import annotations

import torch


def _check(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(values.dtype)
    if not bool(mask.sum() > 0):
        raise ValueError("empty mask: no position to average over")
    return mask


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i m_i x_i."""
    mask = _check(values, mask)
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i m_i x_i / sum_i m_i."""
    mask = _check(values, mask)
    return (values * mask).sum() / mask.sum()

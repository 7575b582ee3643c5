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


def whiten(values: torch.Tensor, mask: torch.Tensor, mean: float, var: float, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) on masked positions, 0 elsewhere, with the moments given.

    Paper sec. 5.3.1 (advantage normalisation). ``mean`` and ``var`` (population) come from the caller so that
    data-parallel ranks whiten with the moments of the whole minibatch (``moments_from_sums`` of all-reduced
    sums), not each its own share. Computed in the dtype of ``values``.
    """
    keep = _check(values, mask).bool()
    scale = torch.rsqrt(torch.tensor(float(var) + eps, dtype=values.dtype, device=values.device))
    return torch.where(keep, (values - float(mean)) * scale, torch.zeros_like(values))


def masked_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n, sum x, sum x^2]`` over the masked positions in float64: what ranks all-reduce to get global moments
    (``algos.ppo.moments_from_sums``). A NaN at a masked-out position does not leak."""
    keep = _check(values, mask).bool()
    clean = torch.where(keep, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    return torch.stack([keep.double().sum(), clean.sum(), (clean * clean).sum()])

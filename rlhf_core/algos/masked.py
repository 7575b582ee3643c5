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


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """sum_i m_i (x_i - mu)^2 / n with mu the masked mean and n = sum_i m_i; times n / (n - 1) if ``unbiased``.

    The Bessel-corrected variance needs at least two masked positions.
    """
    mask = _check(values, mask)
    keep = mask.bool()
    # torch.where rather than a product: a NaN or inf at a masked-out position must not leak into the result.
    clean = torch.where(keep, values, torch.zeros_like(values))
    centred = torch.where(keep, clean - masked_mean(clean, mask), torch.zeros_like(values))
    n = mask.sum()
    var = (centred * centred).sum() / n
    if unbiased:
        if not bool(n >= 2):
            raise ValueError("masked_var: the unbiased variance needs at least two masked positions")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) on masked positions, 0 elsewhere; ``shift_mean=False`` adds mu back.

    mu and var are the masked mean and (population) variance. Keeping the mean (``shift_mean=False``) rescales
    the spread only, so the sign of the average signal survives (the TRL / lm-human-preferences convention).
    """
    keep = _check(values, mask).bool()
    clean = torch.where(keep, values, torch.zeros_like(values))
    mean = masked_mean(clean, mask)
    whitened = (clean - mean) * torch.rsqrt(masked_var(clean, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros_like(whitened))

"""Supervised fine-tuning loss: next-token cross-entropy on response tokens only (prompt tokens masked)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of ``labels`` under ``logits`` with the causal shift.

    logits: ``(B, L, V)`` for input positions; labels: ``(B, L)`` with ``-100`` where no loss applies.
    Position t of the returned ``(B, L-1)`` tensors predicts token t+1:
    ``nll[b, t] = -log softmax(logits[b, t])[labels[b, t+1]]``, and ``mask`` is 1 where a label exists.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return nll * mask, mask


def first_labelled_logit(labels: torch.Tensor) -> int:
    """The first position whose logits predict a label in any row of ``labels`` ``(B, L)``: logits and labels from
    there on (``logits[:, start:]``, ``labels[:, start:]``) give :func:`token_nll` the same loss as the full width.
    The LM head then runs on the response positions only, which at a 49 k vocabulary is most of a small model's
    forward and backward (measured in docs/results/benchmarks.md). 0 when nothing is labelled."""
    predicts_label = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return int(predicts_label.nonzero()[0]) if bool(predicts_label.any()) else 0


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, normaliser: float | torch.Tensor | None = None):
    """Summed response-token NLL divided by ``normaliser`` (default: this batch's response-token count).

    Passing the token count of the whole global batch (all micro-batches and processes of one optimizer step)
    makes gradient accumulation and data-parallel sharding reproduce the large-batch token mean exactly.
    Returns ``(loss, stats)`` with ``stats = {"nll_sum", "tokens"}`` (detached) for logging.
    """
    nll, mask = token_nll(logits, labels)
    tokens = mask.sum()
    if int(tokens) == 0:
        raise ValueError("sft_loss: the batch has no response tokens")
    denom = tokens if normaliser is None else normaliser
    loss = nll.sum() / denom
    return loss, {"nll_sum": nll.sum().detach(), "tokens": tokens.detach()}

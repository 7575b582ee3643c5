"""Advantages without a critic: the group estimators GRPO and RLOO, and REINFORCE++'s returns.

Each prompt is answered several times (a *group*); ``group_ids`` ``(B,)`` says which rows share a prompt. The
baseline a critic would learn is taken from the group instead:

- GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, the group's sample
  standard deviation (Bessel-corrected, as the paper's reference code uses).
- RLOO (Ahmadian et al. 2024, after Kool et al. 2019): ``A_i = r_i - mean_{j != i} r_j``, the mean of the *other*
  answers, so the baseline does not depend on the answer it judges; equal to ``k / (k - 1) (r_i - mean_g r)``.
- REINFORCE++ (Hu 2025): no group needed; the token KL is part of the per-token reward, the return is the
  (discounted) sum of the rewards to come, and the returns are whitened over the whole batch by the caller with the
  same global moments as PPO's advantage normalisation.

GRPO and RLOO give one number per answer; ``broadcast_to_tokens`` puts it on every response token, as PPO's
clipped surrogate wants per-token advantages. Sequence scores are ``(B,)``; per-token tensors are response-aligned
``(B, T)`` as in ``algos.ppo``; padding never reaches a result.
"""

from __future__ import annotations

import torch

from rlhf_core.algos.masked import _check


def _group_index(scores: torch.Tensor, group_ids: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense group index per row, rows per group): ``group_ids`` may be any integers, not only 0..G-1. Both group
    estimators need at least 2 answers per group (a lone answer has no spread and no other answer)."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} should both be (B,)")
    _, dense = torch.unique(group_ids, return_inverse=True)
    sizes = torch.bincount(dense)
    if bool((sizes < 2).any()):
        raise ValueError(f"{estimator}: every group needs at least 2 answers (ppo.samples_per_prompt >= 2)")
    return dense, sizes


def _group_sums(values: torch.Tensor, dense: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, dense, values)


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(r_i - mean_g) / (std_g + eps)`` per row, std with Bessel's correction; ``(B,)``, computed in float64 and
    returned in the scores' dtype. A group whose answers all score the same gets 0 for each (nothing to learn from
    it); a group of one answer is an error, since it has no spread to standardise by."""
    dense, sizes = _group_index(scores, group_ids, "grpo_advantages")
    values = scores.detach().to(torch.float64)
    count = sizes.to(torch.float64)
    mean = _group_sums(values, dense, len(sizes)) / count
    centred = values - mean[dense]
    std = torch.sqrt(_group_sums(centred * centred, dense, len(sizes)) / (count - 1))
    return (centred / (std[dense] + eps)).to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``r_i - (sum_g r - r_i) / (k - 1)`` per row: each answer against the mean of the other ``k - 1`` answers to
    its prompt. ``(B,)``; a group of one answer is an error (it has no other answer to compare with)."""
    dense, sizes = _group_index(scores, group_ids, "rloo_advantages")
    values = scores.detach().to(torch.float64)
    totals = _group_sums(values, dense, len(sizes))
    others = (totals[dense] - values) / (sizes[dense].to(torch.float64) - 1)
    return (values - others).to(scores.dtype)


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma G_{t+1}`` over the response, 0 at padding: REINFORCE++'s return, before the caller whitens
    it over the batch. ``rewards`` ``(B, T)`` already hold ``-kl_coef * KL_t`` on every token and the score on the
    last (``algos.ppo.kl_shaped_rewards``). A reversed cumulative sum when ``gamma`` is 1."""
    keep = _check(rewards, response_mask).bool()
    r = torch.where(keep, rewards.detach(), torch.zeros_like(rewards))
    if gamma == 1.0:
        returns = r.flip(1).cumsum(1).flip(1)
    else:
        running = torch.zeros_like(r[:, 0])
        reversed_returns = []
        for t in reversed(range(r.shape[1])):
            running = r[:, t] + gamma * running
            reversed_returns.append(running)
        returns = torch.stack(reversed_returns[::-1], dim=1)
    return torch.where(keep, returns, torch.zeros_like(returns))


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A per-answer advantage ``(B,)`` on every response token of its row ``(B, T)``, 0 at padding."""
    if advantages.shape != (response_mask.shape[0],):
        raise ValueError(f"advantages {tuple(advantages.shape)} should be ({response_mask.shape[0]},)")
    keep = response_mask.bool()
    return torch.where(keep, advantages.unsqueeze(1).expand(keep.shape), torch.zeros((), dtype=advantages.dtype))

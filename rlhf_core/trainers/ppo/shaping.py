"""Phases 3-5 of a PPO iteration as pure functions of tensors: reward processing, KL-shaped rewards, GAE, and the
per-minibatch advantage normalisation. No models, no I/O, no collectives: moments over every rank come in as
arguments, so each function can be checked by hand (tests/test_ppo_shaping.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_core.algos import critic_free
from rlhf_core.algos import ppo as algo
from rlhf_core.algos.masked import whiten
from rlhf_core.config import PPOConfig, Tricks


@dataclass(frozen=True)
class Shaped:
    scores: torch.Tensor  # (B,) the processed scores: normalised or scaled, clipped
    kl: torch.Tensor  # (B, T) per-token KL estimate, 0 on padding
    rewards: torch.Tensor  # (B, T) -kl_coef * kl, plus the processed score on the last response token
    advantages: torch.Tensor  # (B, T) GAE (or critic-free) advantages, 0 on padding
    returns: torch.Tensor | None  # (B, T) advantages + values, 0 on padding; None without a critic


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    response_mask: torch.Tensor,
    tricks: Tricks,
    ppo: PPOConfig,
    running_mean: float,
    running_std: float,
    kl_coef: float,
    group_ids: torch.Tensor | None = None,
) -> Shaped:
    """Scores -> per-token rewards -> advantages and returns, the paper's recipe steps 3-5:

    3. reward processing (sec. 5.3.1, eq. 18): normalise with the running (historical) moments, or scale by the
       running std (the released script), then clip to [-ppo.reward_clip, ppo.reward_clip];
    4. KL-shaped rewards (sec. 5.3.2): r_t = -kl_coef * KL_t on every response token, plus the score on the last;
    5. advantages by ``tricks.advantage_estimator``: GAE (sec. 3.2) with ppo.gamma and ppo.lam over the critic's
       ``values``; or, without a critic, GRPO / RLOO over each answer's total reward (score minus kl_coef x its KL)
       within its prompt's group ``group_ids``, on every token; or REINFORCE++'s returns, which the caller whitens
       over the whole rollout (its moments span every rank).

    ``scores`` ``(B,)`` are the reward model's (after any missing-EOS penalty); ``running_mean`` / ``running_std``
    already include this batch; ``kl_coef`` is 0 when the KL penalty is off.
    """
    if tricks.reward_norm:
        scores = algo.normalize_scores(scores, running_mean, running_std)
    elif tricks.reward_scaling:
        scores = algo.scale_scores(scores, running_std)
    if tricks.reward_clip:
        scores = algo.clip_scores(scores, ppo.reward_clip)
    kl = algo.kl_penalty(logprobs, ref_logprobs, tricks.kl_estimator) * response_mask
    rewards = algo.kl_shaped_rewards(scores, kl, response_mask, kl_coef)
    advantages, returns = _advantages(rewards, values, response_mask, tricks, ppo, group_ids)
    return Shaped(scores, kl, rewards, advantages, returns)


def _advantages(rewards, values, response_mask, tricks: Tricks, ppo: PPOConfig, group_ids):
    """(advantages, returns) of the KL-shaped rewards by the estimator the tricks name; returns only with a critic."""
    estimator = tricks.advantage_estimator
    if estimator == "gae":
        return algo.gae_advantages(rewards, values, response_mask, ppo.gamma, ppo.lam)
    if estimator == "reinforce_pp":
        return critic_free.discounted_returns(rewards, response_mask, ppo.gamma), None
    if group_ids is None:
        raise ValueError(f"shape_rewards: the {estimator} advantage needs each row's group_ids")
    total = (rewards * response_mask).sum(dim=1)  # the score minus kl_coef x the answer's KL
    per_answer = (critic_free.grpo_advantages(total, group_ids) if estimator == "grpo"
                  else critic_free.rloo_advantages(total, group_ids))  # fmt: skip
    return critic_free.broadcast_to_tokens(per_answer, response_mask), None


def minibatch_advantages(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    tricks: Tricks,
    advantage_clip: float,
    moments: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """A minibatch's advantages as the losses use them (sec. 5.3.1): whitened with the minibatch's (count, mean,
    variance) ``moments`` over every rank when ``tricks.advantage_norm``, then clipped to [-advantage_clip,
    advantage_clip] when ``tricks.advantage_clip``."""
    if tricks.advantage_norm:
        if moments is None:
            raise ValueError("minibatch_advantages: advantage_norm needs the minibatch's moments")
        _, mean, var = moments
        advantages = whiten(advantages, response_mask, mean, var)
    if tricks.advantage_clip:
        advantages = algo.clip_advantages(advantages, advantage_clip)
    return advantages

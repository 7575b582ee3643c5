"""Phases 1 and 2 of a PPO iteration: sample responses from the policy, then score them with the four models."""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_core.algos import ppo as algo
from rlhf_core.config import SamplingConfig
from rlhf_core.models.causal_lm import response_logits
from rlhf_core.models.critic import response_values
from rlhf_core.models.generation import sample_responses
from rlhf_core.models.reward import generated_scores
from rlhf_core.trainers.ppo.experience import Experience
from rlhf_core.trainers.ppo.models import PPOModels


def sample_rollout(
    models: PPOModels, tokenizer, prompts: list[str], sampling: SamplingConfig, max_new_tokens: int, batch_size: int
) -> Experience:
    """Phase 1 (paper sec. 5.1): one response per prompt from the current policy with the paper's sampling
    (temperature, top-p, repetition penalty, stop at EOS), continuing the run's RNG stream."""
    policy = models.policy.unwrapped()
    got = sample_responses(
        policy, tokenizer, prompts, sampling, max_new_tokens, None, models.device, batch_size, models.synced_gpus
    )
    responses, response_mask = got["responses"], got["response_mask"]
    return Experience(
        prompts=prompts,
        texts=got["texts"],
        queries=got["query_ids"],
        responses=responses,
        query_responses=torch.cat([got["query_ids"], responses], dim=1),
        attention_mask=torch.cat([got["query_mask"], response_mask], dim=1),
        response_mask=response_mask.float(),
        eos=(responses == tokenizer.eos_token_id).any(dim=1),
    )


@torch.no_grad()
def score(models: PPOModels, exp: Experience, temperature: float, batch_size: int) -> Experience:
    """Phase 2: log-probs of the policy and the reference at the sampling temperature (the ratio and the KL are
    about the distribution that was sampled), perplexity terms at temperature 1, critic values and the reward
    model's score of each whole response, in no-grad forwards of ``batch_size`` sequences."""
    policy = models.policy.unwrapped()
    critic = models.critic.unwrapped()
    qw, width = exp.query_width, exp.response_width
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("logprobs", "ref_logprobs", "nll", "ref_nll", "entropy", "values", "scores")
    }
    for start in range(0, len(exp.prompts), batch_size):
        ids = exp.query_responses[start : start + batch_size]
        mask = exp.attention_mask[start : start + batch_size]
        tokens = exp.responses[start : start + batch_size]
        logits = response_logits(policy, ids, mask, qw, width)
        with models.reference() as reference:
            ref_logits = response_logits(reference, ids, mask, qw, width)
        parts["logprobs"].append(algo.logprobs_from_logits(logits, tokens, temperature))
        parts["ref_logprobs"].append(algo.logprobs_from_logits(ref_logits, tokens, temperature))
        parts["nll"].append(-algo.logprobs_from_logits(logits, tokens))
        parts["ref_nll"].append(-algo.logprobs_from_logits(ref_logits, tokens))
        parts["entropy"].append(algo.entropy_from_logits(logits, temperature))
        parts["values"].append(response_values(critic, ids, mask, qw, width))
        parts["scores"].append(_reward(models, ids, mask))
    return replace(exp, **{name: torch.cat(tensors) for name, tensors in parts.items()})


def _reward(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reward model's scores, or with ``ppo.reward_ensemble`` the ensemble's conservative score."""
    if not models.reward_members:
        return generated_scores(models.reward_model, ids, mask)
    scores = torch.stack([generated_scores(model, ids, mask) for model, _, _ in models.reward_members])
    means = torch.tensor([m for _, m, _ in models.reward_members], device=scores.device)
    stds = torch.tensor([s for _, _, s in models.reward_members], device=scores.device)
    return algo.ensemble_scores(scores, means, stds, models.ensemble_penalty)

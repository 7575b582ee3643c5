"""Phases 1 and 2 of a PPO iteration: sample responses from the policy, then score them with the four models."""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_core.algos import ppo as algo
from rlhf_core.config import GenerationEngineConfig, PPOConfig, PPOSizes, SamplingConfig
from rlhf_core.data.batching import Cut
from rlhf_core.models.causal_lm import response_logits
from rlhf_core.models.critic import response_values
from rlhf_core.models.generation import sample_responses
from rlhf_core.models.reward import score_rollout
from rlhf_core.trainers.ppo import batches
from rlhf_core.trainers.ppo.experience import Experience
from rlhf_core.trainers.ppo.models import PPOModels


def sample_rollout(
    models: PPOModels,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    max_new_tokens: int,
    batch_size: int,
    engine: GenerationEngineConfig | None = None,
) -> Experience:
    """Phase 1 (paper sec. 5.1): one response per prompt from the current policy with the paper's sampling
    (temperature, top-p, repetition penalty, stop at EOS), continuing the run's RNG stream; ``engine``: the
    ``generation`` group (the engine's own log-probs are not kept: the old log-probs come from the update's forward)."""
    policy = models.policy.unwrapped()
    got = sample_responses(
        policy,
        tokenizer,
        prompts,
        sampling,
        max_new_tokens,
        None,
        models.device,
        batch_size,
        models.synced_gpus,
        engine=engine,
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
        pad_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def score(models: PPOModels, exp: Experience, ppo: PPOConfig, sizes: PPOSizes, iteration: int) -> Experience:
    """Phase 2: log-probs of the policy and the reference at the sampling temperature (the ratio and the KL are
    about the distribution that was sampled), perplexity terms at temperature 1, critic values (none without a
    critic) and the reward model's score of each whole response, in no-grad forwards of rows laid out end to end
    (``batches``).

    The policy and the reference read the update's first-epoch micro-batches: the old log-probs are then the
    update's own arithmetic (ratio exactly 1 before the first step) and the two models' log-probs come from the
    same shapes (KL exactly 0 while they are equal). The critic and reward model read the rollout grouped by
    length. Log-prob terms are taken in chunks of ``ppo.logprob_chunk_tokens`` positions."""
    policy = models.policy.unwrapped()
    critic = models.critic.unwrapped() if models.critic is not None else None
    temperature, chunk = ppo.sampling.temperature, ppo.logprob_chunk_tokens
    terms = ("logprobs", "ref_logprobs", "nll", "ref_nll", "entropy") + (("values",) if critic is not None else ())
    full = {k: torch.zeros(exp.responses.shape, device=exp.responses.device) for k in terms}
    scores = torch.zeros(len(exp.prompts), device=exp.responses.device)

    def put(name: str, c: Cut, values: torch.Tensor) -> None:
        full[name][c.rows.to(values.device), : c.response_width] = values.float()

    for c in batches.policy_scoring_cuts(exp, ppo, sizes, iteration):
        ids, mask, starts = batches.inputs(exp, c)
        tokens = batches.responses(exp.responses, c)
        logprobs, logprobs_t1, entropy = algo.logprob_terms(
            response_logits(policy, ids, mask, starts, c.response_width), tokens, temperature, chunk
        )
        with models.reference() as reference:
            ref_logits = response_logits(reference, ids, mask, starts, c.response_width)
        ref_logprobs, ref_logprobs_t1, _ = algo.logprob_terms(ref_logits, tokens, temperature, chunk)
        for name, values in (("logprobs", logprobs), ("nll", -logprobs_t1), ("entropy", entropy),
                             ("ref_logprobs", ref_logprobs), ("ref_nll", -ref_logprobs_t1)):  # fmt: skip
            put(name, c, values)
    for c in batches.scoring_cuts(exp, ppo):
        ids, mask, starts = batches.inputs(exp, c)
        if critic is not None:
            put("values", c, response_values(critic, ids, mask, starts, c.response_width))
        rows = c.rows.to(scores.device)
        scores[rows] = _reward(models, ids, mask, exp.response_mask[rows].sum(1))
    return replace(exp, scores=scores, **full)


def _reward(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reward model's scores, or with ``ppo.reward_ensemble`` the ensemble's conservative score; with
    ``ppo.length_debias`` each model's linear length term is taken out before anything else."""
    if not models.reward_members:
        score = score_rollout(models.reward_model, ids, mask)
        return _debiased(score, lengths, models.reward_stats["length"]) if models.length_debias else score
    scores = torch.stack([score_rollout(model, ids, mask) if length is None
                          else _debiased(score_rollout(model, ids, mask), lengths, length)
                          for model, _, _, length in models.reward_members])  # fmt: skip
    means = torch.tensor([m for _, m, _, _ in models.reward_members], device=scores.device)
    stds = torch.tensor([s for _, _, s, _ in models.reward_members], device=scores.device)
    return algo.ensemble_scores(scores, means, stds, models.ensemble_penalty)


def _debiased(scores: torch.Tensor, lengths: torch.Tensor, length: dict) -> torch.Tensor:
    return algo.remove_length_term(scores.float(), lengths.to(scores.device), length["slope"], length["mean"])

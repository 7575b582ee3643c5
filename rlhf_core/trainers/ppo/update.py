"""Phase 6 of a PPO iteration: ``ppo.epochs`` passes over the buffer in minibatches, one optimizer step of the
critic and (after the critic warm-up) of the policy per minibatch.

Every loss is a token mean over the whole minibatch, whatever the micro-batch size and number of processes: each
micro-batch's token sum is divided by ``normaliser`` = (tokens of the minibatch on every process) / (micro-batches
x processes), and the engines divide by the micro-batch count and average the processes (``algos.ppo.token_mean``,
as ``sft_loss(normaliser=)`` does for SFT). Logged losses and statistics are aggregated the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from rlhf_core import distributed
from rlhf_core.algos import ppo as algo
from rlhf_core.algos.sft import IGNORE_INDEX, sft_loss
from rlhf_core.config import Config, PPOSizes, Tricks
from rlhf_core.data.batching import Cut
from rlhf_core.data.order import global_order
from rlhf_core.data.tokenize import collate_sft
from rlhf_core.models.causal_lm import response_logits
from rlhf_core.models.critic import response_values
from rlhf_core.trainers.ppo import batches
from rlhf_core.trainers.ppo.experience import Experience
from rlhf_core.trainers.ppo.models import PPOModels
from rlhf_core.trainers.ppo.monitor import NonFiniteGuard
from rlhf_core.trainers.ppo.shaping import minibatch_advantages

PtxBatches = Iterator[list[dict[str, torch.Tensor]]]


def update(
    models: PPOModels,
    exp: Experience,
    config: Config,
    tricks: Tricks,
    sizes: PPOSizes,
    iteration: int,
    guard: NonFiniteGuard,
    ptx: PtxBatches | None,
) -> dict[str, float]:
    """Train on this rank's buffer ``exp`` for iteration ``iteration`` (0-based); returns the mean over minibatches
    (and ranks) of each logged loss and statistic, the learning rates and the count of skipped updates."""
    ppo = config.ppo
    train_policy = iteration >= sizes.warmup_iterations  # critic warm-up (sec. 5.3.3): the policy waits
    logs: dict[str, list[float]] = {}
    for epoch in range(ppo.epochs):
        for idx in batches.minibatch_rows(ppo, sizes, iteration, epoch):
            ptx_batches = next(ptx) if train_policy and ptx is not None else None
            stats, bad = train_minibatch(models, exp, idx, config, tricks, sizes, train_policy, ptx_batches)
            guard.observe(bad, iteration + 1)
            for key, value in stats.items():
                logs.setdefault(key, []).append(value)
    record = {key: distributed.global_mean(values) for key, values in logs.items()}
    if "loss/policy" in record:
        record["loss/total"] = (record["loss/policy"] + ppo.vf_coef * record.get("loss/value", 0.0)
                                + ppo.ptx_coef * record.get("loss/ptx", 0.0))  # fmt: skip
    record["policy/lr"] = models.policy.current_lr()
    if models.critic is not None:
        record["critic/lr"] = models.critic.current_lr()
    record["ppo/skipped_updates"] = sum(engine.skipped_steps for engine in models.trained)
    return record


def train_minibatch(
    models: PPOModels,
    exp: Experience,
    idx: torch.Tensor,
    config: Config,
    tricks: Tricks,
    sizes: PPOSizes,
    train_policy: bool,
    ptx_batches: list[dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, float], bool]:
    """One optimizer step of the policy (when ``train_policy``) and of the critic (where there is one) on the
    rollouts ``idx`` of this rank, in micro-batches (``batches.update_cuts``). Returns this rank's share of the
    minibatch statistics and whether any loss or gradient was non-finite (that update is skipped).

    The number of micro-batches follows the token budget; the losses do not depend on it: each micro-batch's token
    sum is divided by ``normaliser`` and the engines by the fixed ``sizes.accumulation``. PPO-ptx batches join the
    policy's micro-batches one to one; any left over take micro-steps of their own."""
    ppo = config.ppo
    mask = exp.response_mask[idx]
    moments = distributed.global_moments(exp.advantages[idx], mask) if tricks.advantage_norm else None
    advantages = exp.advantages.clone()
    advantages[idx] = minibatch_advantages(exp.advantages[idx], mask, tricks, ppo.advantage_clip, moments)
    normaliser = token_normaliser(float(mask.sum()), sizes)
    ptx_normaliser = None
    if ptx_batches is not None:
        ptx_tokens = sum(float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in ptx_batches)
        ptx_normaliser = token_normaliser(ptx_tokens, sizes)
    cuts = batches.update_cuts(exp, idx, ppo)
    policy_steps = max(len(cuts), len(ptx_batches or ())) if train_policy else 0
    sums: dict[str, float] = {}
    bad = False
    for j in range(max(len(cuts), policy_steps)):
        c = cuts[j] if j < len(cuts) else None
        stats: dict[str, float] = {}
        if j < policy_steps:
            models.policy.set_boundary(j == policy_steps - 1)
            terms = []
            if c is not None:
                surrogate, stats = policy_loss(models, exp, c, advantages, config, tricks, normaliser)
                terms.append(surrogate)
            if ptx_batches is not None and j < len(ptx_batches):
                ptx, stats["loss/ptx"] = ptx_loss(models, ptx_batches[j], ptx_normaliser)
                terms.append(ppo.ptx_coef * ptx)
            bad |= _backward_and_step(models.policy, sum(terms[1:], terms[0]))
        if c is not None and models.critic is not None:
            models.critic.set_boundary(j == len(cuts) - 1)
            loss, critic_stats = critic_loss(models, exp, c, config, tricks, normaliser)
            bad |= _backward_and_step(models.critic, ppo.vf_coef * loss)
            stats.update(critic_stats)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    # The engine divides each micro-batch's loss by sizes.accumulation: so do the logged shares.
    shares = {key: value / sizes.accumulation for key, value in sums.items()}
    if train_policy and models.policy.last_grad_norm is not None:
        shares["policy/grad_norm"] = models.policy.last_grad_norm
    return shares, bad


def token_normaliser(local_tokens: float, sizes: PPOSizes) -> float:
    """The divisor that turns micro-batch token sums into the minibatch's token mean after the engines divide by
    ``sizes.accumulation`` and average the processes (however many micro-batches there are)."""
    return distributed.global_sum(local_tokens) / (sizes.accumulation * sizes.world_size)


def policy_loss(
    models: PPOModels,
    exp: Experience,
    c: Cut,
    advantages: torch.Tensor,
    config: Config,
    tricks: Tricks,
    normaliser: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's loss on the micro-batch ``c``: the clipped surrogate (sec. 3.2) minus the entropy bonus, as
    the trick switches say. ``advantages`` is buffer-wide ``(B, T)`` (this minibatch's rows processed)."""
    ppo, mask = config.ppo, batches.responses(exp.response_mask, c)
    temperature = ppo.sampling.temperature
    ids, attention, starts = batches.inputs(exp, c)
    with models.policy.autocast():
        logits = response_logits(
            models.policy.forward, ids, attention, starts, c.response_width, module=models.policy.unwrapped()
        )
    logprobs = algo.logprobs_from_logits(logits, batches.responses(exp.responses, c), temperature)
    loss, pg = algo.policy_loss(logprobs, batches.responses(exp.logprobs, c), batches.responses(advantages, c), mask,
                                ppo.cliprange, tricks.policy_loss_clip, normaliser)  # fmt: skip
    stats = {"loss/policy": float(loss.detach()), **{f"policy/{k}": float(v) for k, v in pg.items()}}
    if tricks.entropy_bonus:
        entropy = algo.chunked_entropy(logits, temperature, ppo.logprob_chunk_tokens)
        loss = loss + ppo.entropy_coef * algo.entropy_loss(entropy, mask, normaliser)[0]
    return loss, stats


def ptx_loss(
    models: PPOModels, ptx_batch: dict[str, torch.Tensor], ptx_normaliser: float
) -> tuple[torch.Tensor, float]:
    """PPO-ptx (sec. 5.4): the language-model loss on a micro-batch of demonstrations, as its share of the token
    mean over the update's demonstrations; with its value for the logs."""
    with models.policy.autocast():
        logits = models.policy.forward(
            input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"]
        ).logits
    ptx, _ = sft_loss(logits.float(), ptx_batch["labels"], normaliser=ptx_normaliser)
    return ptx, float(ptx.detach())


def critic_loss(
    models: PPOModels, exp: Experience, c: Cut, config: Config, tricks: Tricks, normaliser: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's (clipped) value loss on the micro-batch ``c`` against the GAE returns (sec. 5.3)."""
    ppo = config.ppo
    ids, attention, starts = batches.inputs(exp, c)
    with models.critic.autocast():
        values = response_values(models.critic.forward, ids, attention, starts, c.response_width)
    loss, stats = algo.value_loss(values, batches.responses(exp.values, c), batches.responses(exp.returns, c),
                                  batches.responses(exp.response_mask, c), ppo.cliprange_value, tricks.value_loss_clip,
                                  normaliser)  # fmt: skip
    return loss, {"loss/value": float(loss.detach()), "val/clipfrac": float(stats["clipfrac"])}


def ptx_minibatches(
    examples: list[tuple[list[int], list[int]]],
    pad_id: int,
    config: Config,
    sizes: PPOSizes,
    rank: int,
    first_update: int,
    device,
) -> PtxBatches:
    """PPO-ptx demonstrations (sec. 5.4), one list of micro-batches per policy update, from update ``first_update``
    on (a resumed run's position): the u-th update takes the u-th global batch of ``ppo.minibatch_size`` examples
    of a seeded order over ``sft_train``, sliced like the rollout (this rank's share, then micro-batches)."""
    ppo = config.ppo
    order = global_order(len(examples), ppo.steps * sizes.updates_per_iteration * ppo.minibatch_size, ppo.seed + 1)
    for u in itertools.count(first_update):
        chosen = order[u * ppo.minibatch_size : (u + 1) * ppo.minibatch_size]
        mine = chosen[rank * sizes.local_minibatch : (rank + 1) * sizes.local_minibatch]
        micro_batches = [mine[j : j + ppo.micro_batch_size] for j in range(0, len(mine), ppo.micro_batch_size)]
        yield [
            {k: v.to(device) for k, v in collate_sft([examples[i] for i in ids], pad_id).items()}
            for ids in micro_batches
        ]


def _backward_and_step(engine: distributed.Engine, loss: torch.Tensor) -> bool:
    """Backward one micro-batch and count it (the engine steps at the accumulation boundary). True when the loss
    or the update's gradient was non-finite, i.e. the update is (or will be) skipped.

    An engine that drops a whole update whose gradient norm is non-finite (the torch one) may take a NaN loss: it
    poisons exactly that update. One that would apply NaN gradients (DeepSpeed) gets the finite micro-batches only,
    and the update applies the finite rest of the minibatch.
    """
    finite = _finite_everywhere(loss)
    skipped_before = engine.skipped_steps
    if finite or engine.drops_non_finite_updates:
        engine.backward(loss)
    engine.step()
    return not finite or engine.skipped_steps > skipped_before


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (ranks must agree to skip, or collectives would hang)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0)  # host: a flag
    return float(distributed.all_reduce_sum(bad)) == 0.0

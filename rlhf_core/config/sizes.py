"""Sizes derived from the configuration, computed once by exact division or refused with a clear error."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_core.errors import ConfigError

if TYPE_CHECKING:
    from rlhf_core.config.schema import PPOConfig, SupervisedStageConfig


@dataclass(frozen=True)
class PPOSizes:
    """Sizes the PPO stage derives from ``ppo.*`` and the number of processes, computed once (``ppo_sizes``)."""

    world_size: int
    local_rollout: int  # rollouts sampled by each process per iteration
    minibatches: int  # minibatches (optimizer steps of each model) per epoch over the buffer
    local_minibatch: int  # each process's share of a minibatch
    accumulation: int  # micro-batches accumulated into one optimizer step on each process
    updates_per_iteration: int  # epochs x minibatches
    warmup_iterations: int  # critic-only iterations at the start
    policy_updates: int  # optimizer steps of the policy over the run
    critic_updates: int  # optimizer steps of the critic over the run


def _ppo_size_problem(ppo: PPOConfig, world_size: int) -> str | None:
    if (
        ppo.rollout_size % ppo.minibatch_size
        or ppo.minibatch_size % world_size
        or (ppo.minibatch_size // world_size) % ppo.micro_batch_size
    ):
        return (
            f"ppo.rollout_size={ppo.rollout_size} must be a multiple of ppo.minibatch_size={ppo.minibatch_size}, "
            f"which must split evenly over {world_size} process(es) into micro-batches of "
            f"ppo.micro_batch_size={ppo.micro_batch_size}"
        )
    warmup = ppo.critic_warmup_steps if ppo.resolved_tricks().critic_warmup else 0
    if warmup >= ppo.steps:
        return f"ppo.critic_warmup_steps={warmup} leaves no policy update in ppo.steps={ppo.steps}"
    return None


def ppo_sizes(ppo: PPOConfig, world_size: int) -> PPOSizes:
    """Rollout -> minibatches -> each process's micro-batches, by exact division, or a ConfigError saying what to
    change (bench/check_recipe.py checks a recipe's sizes with it too)."""
    problem = _ppo_size_problem(ppo, world_size)
    if problem:
        raise ConfigError(problem)
    minibatches = ppo.rollout_size // ppo.minibatch_size
    local_minibatch = ppo.minibatch_size // world_size
    warmup = ppo.critic_warmup_steps if ppo.resolved_tricks().critic_warmup else 0
    updates = ppo.epochs * minibatches
    return PPOSizes(
        world_size=world_size,
        local_rollout=ppo.rollout_size // world_size,
        minibatches=minibatches,
        local_minibatch=local_minibatch,
        accumulation=local_minibatch // ppo.micro_batch_size,
        updates_per_iteration=updates,
        warmup_iterations=warmup,
        policy_updates=(ppo.steps - warmup) * updates,
        critic_updates=ppo.steps * updates,
    )


def steps_for(num_examples: int, optim: SupervisedStageConfig, world_size: int) -> tuple[int, int]:
    """(global batch size, optimizer steps) for a split: exact division, or a clear error."""
    global_batch = optim.micro_batch_size * optim.gradient_accumulation_steps * world_size
    if num_examples < global_batch:
        raise ConfigError(
            f"the split has {num_examples} examples but one optimizer step needs a global batch of "
            f"{global_batch} (micro_batch_size {optim.micro_batch_size} x gradient_accumulation_steps "
            f"{optim.gradient_accumulation_steps} x {world_size} processes); lower the batch or add data"
        )
    if optim.max_steps is not None:
        return global_batch, optim.max_steps
    return global_batch, max(1, math.floor(num_examples * optim.epochs / global_batch))

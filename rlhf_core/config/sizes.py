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
    problem = _grouping_problem(ppo, world_size)
    if problem:
        return problem
    warmup = ppo.critic_warmup_steps if ppo.resolved_tricks().critic_warmup else 0
    if warmup >= ppo.steps:
        return f"ppo.critic_warmup_steps={warmup} leaves no policy update in ppo.steps={ppo.steps}"
    return None


def _grouping_problem(ppo: PPOConfig, world_size: int) -> str | None:
    """What is wrong with the answers-per-prompt grouping or the critic switches of a critic-free estimator."""
    tricks, k = ppo.resolved_tricks(), ppo.samples_per_prompt
    if (ppo.rollout_size // world_size) % k:
        return (
            f"ppo.samples_per_prompt={k} must divide each process's share of the rollout (ppo.rollout_size="
            f"{ppo.rollout_size} over {world_size} process(es)): a prompt's answers are sampled together"
        )
    if tricks.advantage_estimator in ("grpo", "rloo") and k < 2:
        return (f"the {tricks.advantage_estimator} advantage compares the answers to one prompt: set "
                "ppo.samples_per_prompt to 2 or more (4 to 8 is usual)")  # fmt: skip
    if not tricks.uses_critic:
        critic_switches = [s for s in ("critic_warmup", "value_loss_clip", "critic_from_rm") if getattr(tricks, s)]
        if critic_switches:
            return (f"ppo.tricks.{critic_switches[0]} needs a critic, and the {tricks.advantage_estimator} advantage "
                    "trains none: switch it off or use advantage_estimator gae")  # fmt: skip
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
        critic_updates=ppo.steps * updates if ppo.resolved_tricks().uses_critic else 0,
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

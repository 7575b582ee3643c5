"""One PPO iteration as the paper's recipe, over a :class:`PPORun` that carries the state between iterations.

``ppo_iteration`` is what the stage loop and the benchmarks call; each phase is a function of its own module:
``rollout.sample_rollout`` and ``rollout.score`` (1-2), ``shaping.shape_rewards`` (3-5), ``update.update`` (6).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf_core import distributed
from rlhf_core.algos import ppo as algo
from rlhf_core.algos.masked import whiten
from rlhf_core.config import Config, PPOSizes, Tricks, ppo_sizes
from rlhf_core.data.limits import response_token_limit
from rlhf_core.data.order import global_order
from rlhf_core.data.rows import load_split
from rlhf_core.data.tokenize import encode_query, encode_response
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.trainers.ppo import batches
from rlhf_core.trainers.ppo.experience import Experience
from rlhf_core.trainers.ppo.models import PPOModels
from rlhf_core.trainers.ppo.monitor import CollapseMonitor, NonFiniteGuard
from rlhf_core.trainers.ppo.rollout import sample_rollout, score
from rlhf_core.trainers.ppo.shaping import shape_rewards
from rlhf_core.trainers.ppo.update import PtxBatches, ptx_minibatches, update


@dataclass
class PPORun:
    """Everything a PPO run carries from one iteration to the next; what a checkpoint saves besides the engines."""

    config: Config
    ctx: distributed.DistContext
    tricks: Tricks
    sizes: PPOSizes
    tokenizer: object
    models: PPOModels
    prompts: list[str]  # the ppo split
    prompt_order: list[int]  # global order of prompts over the run, the same on every rank
    sft_examples: list  # (query ids, response ids) of sft_train for PPO-ptx; empty when ptx is off
    judge: object | None  # the gold judge on the simulated domain (monitoring only), else None
    moments: algo.RunningMoments  # running moments of every score seen (eq. 18)
    kl_controller: algo.FixedKLController | algo.AdaptiveKLController
    monitor: CollapseMonitor
    guard: NonFiniteGuard
    ptx: PtxBatches | None = None
    mlflow_run_id: str | None = None  # this run's MLflow run, saved in checkpoints so a resumed run can link to it
    resumed_from_run_id: str | None = None  # the MLflow run of the checkpoint this run resumed from

    def prompts_for(self, iteration: int) -> list[str]:
        """This rank's share of the iteration's ``ppo.rollout_size`` rows: ``rollout_size / samples_per_prompt``
        prompts, each repeated ``samples_per_prompt`` times in a row (a group never spans two ranks)."""
        k = self.config.ppo.samples_per_prompt
        size, local = self.config.ppo.rollout_size // k, self.sizes.local_rollout // k
        take = self.prompt_order[iteration * size : (iteration + 1) * size]
        return [self.prompts[i] for i in take[self.ctx.rank * local : (self.ctx.rank + 1) * local] for _ in range(k)]

    def group_ids(self, rows: int) -> torch.Tensor:
        """Which prompt each of this rank's rollout rows answers (``prompts_for`` lays a group's rows together)."""
        return torch.arange(rows, device=self.models.device) // self.config.ppo.samples_per_prompt

    def start_ptx(self, first_iteration: int) -> None:
        """Position the PPO-ptx stream at the first policy update of ``first_iteration`` (0 for a fresh run)."""
        if self.sft_examples:
            first_update = max(first_iteration - self.sizes.warmup_iterations, 0) * self.sizes.updates_per_iteration
            self.ptx = ptx_minibatches(self.sft_examples, self.tokenizer.pad_token_id, self.config, self.sizes,
                                       self.ctx.rank, first_update, self.ctx.device)  # fmt: skip


def start_run(config: Config, ctx: distributed.DistContext, checkpoint_root: Path, gold_judge: bool = True) -> PPORun:
    """Load the data and the four models and set up the run's state; ``gold_judge=False`` leaves the simulated
    domain's gold judge out (the benchmarks compare against trainers that have none)."""
    ppo, data_dir = config.ppo, Path(config.paths.data)
    tricks, sizes = ppo.resolved_tricks(), ppo_sizes(ppo, ctx.world_size)
    distributed.seed_everything(ppo.seed + ctx.rank * 100_003)  # ranks sample different responses
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    prompts = [r["prompt"] for r in load_split(data_dir, "ppo", config.data)]
    sft_rows = load_split(data_dir, "sft_train", config.data) if tricks.ptx else []
    sft_examples = [(encode_query(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])) for r in sft_rows]
    models = PPOModels(config, tokenizer, ctx, sizes, tricks)
    moments = algo.RunningMoments()
    if models.reward_stats and (tricks.reward_norm or tricks.reward_scaling):
        # Calibrated from the first step: the RM's score statistics on SFT samples (rm stage).
        stats = models.reward_stats
        # With the length term removed the scores keep their mean on SFT samples and lose its share of the spread.
        std = stats["length"]["residual_std"] if ppo.length_debias else stats["std"]
        moments.merge(stats["count"], stats["mean"], std**2)
    if tricks.kl_controller == "adaptive":
        kl_controller = algo.AdaptiveKLController(tricks.kl_coef, ppo.kl_target, ppo.kl_horizon)
    else:
        kl_controller = algo.FixedKLController(tricks.kl_coef)
    return PPORun(
        config=config,
        ctx=ctx,
        tricks=tricks,
        sizes=sizes,
        tokenizer=tokenizer,
        models=models,
        prompts=prompts,
        prompt_order=global_order(len(prompts), ppo.steps * ppo.rollout_size // ppo.samples_per_prompt, ppo.seed),
        sft_examples=sft_examples,
        judge=_gold_judge(config) if gold_judge else None,
        moments=moments,
        kl_controller=kl_controller,
        monitor=CollapseMonitor(ppo.monitor),
        guard=NonFiniteGuard(ppo.monitor.max_bad_steps, checkpoint_root),
    )


def ppo_iteration(run: PPORun, iteration: int) -> tuple[dict, Experience]:
    """Iteration ``iteration`` (0-based) of PPO-max (paper sec. 5): its metrics record and its experience."""
    ppo, tricks, timer = run.config.ppo, run.tricks, PhaseTimer()
    with timer("generation"):  # 1. rollout
        exp = sample_rollout(run.models, run.tokenizer, run.prompts_for(iteration), ppo.sampling,
                             response_token_limit(run.config), ppo.generation_batch_size,
                             run.config.generation)  # fmt: skip
    with timer("scoring"):
        exp = score(run.models, exp, ppo, run.sizes, iteration)  # 2. score
        scores = algo.penalise_missing_eos(exp.scores, exp.eos, ppo.missing_eos_penalty)
        run.moments.merge(*distributed.global_moments(scores))  # 3. running moments over every rank and step
        kl_coef = run.kl_controller.value if tricks.kl_penalty else 0.0
        group_ids = run.group_ids(len(exp.prompts))
        shaped = shape_rewards(scores, exp.logprobs, exp.ref_logprobs, exp.values, exp.response_mask, tricks, ppo,
                               run.moments.mean, run.moments.std, kl_coef, group_ids)  # fmt: skip  # 3-5
        advantages = shaped.advantages
        if tricks.advantage_estimator == "reinforce_pp":  # its returns whitened over the rollout of every rank
            _, mean, var = distributed.global_moments(advantages, exp.response_mask)
            advantages = whiten(advantages, exp.response_mask, mean, var)
        exp = replace(exp, rewards=shaped.rewards, advantages=advantages, returns=shaped.returns, group_ids=group_ids,
                      gold_scores=_gold_scores(run.judge, exp))  # fmt: skip
        record = {"step": iteration + 1, **rollout_metrics(exp, run.moments, kl_coef),
                  **batches.padding_record(exp, ppo, run.sizes, iteration)}  # fmt: skip
        run.kl_controller.update(record["objective/kl"], ppo.rollout_size)
    with timer("training"):  # 6. epochs x minibatches
        record.update(update(run.models, exp, run.config, tricks, run.sizes, iteration, run.guard, run.ptx))
    record.update(timer.seconds)
    return record, exp


def rollout_metrics(exp: Experience, moments: algo.RunningMoments, kl_coef: float) -> dict[str, float]:
    """The rollout's DESIGN.md metrics as means over every rank, including the paper's collapse signals (KL,
    length, perplexities) and, on the simulated domain, the gold score the policy never sees."""
    mask = exp.response_mask
    n_tokens = float(mask.sum())
    record = {
        "objective/scores": distributed.global_mean(exp.scores.tolist()),
        "objective/kl": distributed.global_mean(((exp.logprobs - exp.ref_logprobs) * mask).sum(dim=1).tolist()),
        "objective/rlhf_reward": distributed.global_mean((exp.rewards * mask).sum(dim=1).tolist()),
        "objective/entropy": distributed.global_mean([float((exp.entropy * mask).sum())], n_tokens),
        "rollout/response_length": distributed.global_mean(mask.sum(dim=1).tolist()),
        "rollout/eos_rate": distributed.global_mean(exp.eos.float().tolist()),
        "rollout/repetition": distributed.global_mean(algo.repetition_rate(exp.responses, mask).tolist()),
        "monitor/ppl_policy": math.exp(distributed.global_mean([float((exp.nll * mask).sum())], n_tokens)),
        "monitor/ppl_ref": math.exp(distributed.global_mean([float((exp.ref_nll * mask).sum())], n_tokens)),
        "reward/running_mean": moments.mean,
        "reward/running_std": moments.std,
        "objective/kl_coef": kl_coef,
    }
    if exp.gold_scores is not None:
        record["monitor/gold_score"] = distributed.global_mean(exp.gold_scores)
    return record


class PhaseTimer:
    """Wall time per phase of an iteration (``time/generation``, ``time/scoring``, ``time/training``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        yield
        self.seconds[f"time/{phase}"] = time.perf_counter() - started


def _gold_scores(judge, exp: Experience) -> list[float] | None:
    if judge is None:
        return None
    return [judge.score(prompt, text) for prompt, text in zip(exp.prompts, exp.texts, strict=True)]


def _gold_judge(config: Config):
    if config.data.source != "sim":
        return None
    from rlhf_core.data.judge import GoldJudge
    from rlhf_core.data.sources import build_world

    return GoldJudge(build_world(config.data))

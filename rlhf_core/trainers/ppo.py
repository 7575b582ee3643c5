"""The `ppo` stage: PPO-max (paper sec. 5), every trick a switch (``ppo.preset`` + ``ppo.tricks``).

One iteration, top to bottom:

1. rollout: sample ``rollout_size`` responses from the policy (temperature, top-p, repetition penalty, EOS);
2. score: reward-model score at the last token; log-probs of policy and reference; critic values;
3. reward processing: running moments of all scores seen; normalise (or scale) and clip (eq. 18);
4. KL-shaped per-token rewards: -kl_coef * KL_t, plus the processed score on the last token (sec. 5.3.2);
5. GAE advantages and returns (gamma, lam);
6. ``epochs`` x minibatches: advantage whitening/clipping; clipped policy loss (+ entropy bonus, + PPO-ptx on
   SFT demonstrations); clipped value loss; global gradient clipping. During critic warm-up only the critic
   learns (sec. 5.3.3).

Outputs under ``paths.ppo``: ``model/`` (the final policy, a Hugging Face causal-LM directory), ``metrics.json``,
``tricks.json`` (the resolved switches), ``samples.jsonl`` (a sample table every ``sample_every`` iterations),
``plots/`` (CSV for DVC and the PNG of the paper's collapse signals), ``checkpoints/`` and ``config.yaml``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.algos import ppo as algo
from rlhf_core.algos.sft import sft_loss
from rlhf_core.checkpoint import config_fingerprint, list_checkpoints, load_checkpoint, save_checkpoint
from rlhf_core.config import Config, OptimConfig, save_config
from rlhf_core.data.order import global_order
from rlhf_core.data.rows import load_split
from rlhf_core.data.tokenize import (
    collate_sft,
    encode_query,
    encode_response,
    eos_response_mask,
    left_pad,
    position_ids,
)
from rlhf_core.errors import ConfigError, DataError, RLHFError
from rlhf_core.io import atomic_directory, atomic_write_json, atomic_write_jsonl, read_json
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.critic import load_critic
from rlhf_core.models.generation import pad_right, sample, sample_responses
from rlhf_core.models.reward import load_reward_model, score_samples
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.plots import save_figure
from rlhf_core.tracking import Logger, NullLogger
from rlhf_core.trainers.results import TrainingResult


# ------------------------------------------------------------------------------------------ rollout pieces
def _response_logits(model, ids, mask, query_width: int, width: int) -> torch.Tensor:
    """Logits predicting each response token: position ``query_width - 1 + t`` predicts response token t.

    ``ids`` is ``query_width + width`` wide, so these are the last ``width + 1`` positions but one. The LM head
    runs on those only (``logits_to_keep``): the query's logits would be thrown away, and at a large vocabulary
    they are the biggest activation of the forward (same logits, bit for bit; measured in BENCHMARKS.md).
    """
    assert ids.shape[1] == query_width + width, (ids.shape, query_width, width)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=width + 1).logits
    return logits[:, :width].float()


# ------------------------------------------------------------------------------------------ the stage
class _Models:
    """Policy and critic engines plus the frozen reference and reward model.

    Under ZeRO-3 all four are sharded over the ranks (the frozen two without optimizer), so each of N ranks holds
    about 1/N of every model; every forward then gathers layers from all ranks, which is why sampling runs with
    ``synced_gpus`` and the final evaluation runs on every rank.
    """

    def __init__(self, config: Config, tokenizer, ctx, total_policy_steps: int, total_critic_steps: int, tricks):
        ppo = config.ppo
        sft_dir, rm_dir = Path(config.paths.sft) / "model", Path(config.paths.rm) / "model"
        for path, stage in ((sft_dir, "sft"), (rm_dir, "rm")):
            if not (path / "config.json").is_file():
                raise DataError(f"no model at {path} (run `rlhf {stage}` first)")
        self.sharded = distributed.shards_parameters(ctx, config.distributed)
        # Ranks stop sampling at different lengths; with sharded weights each must keep stepping until all are done.
        self.synced_gpus = self.sharded and ctx.world_size > 1
        # The FrozenModel objects stay referenced: under ZeRO-3 they keep the engines whose hooks gather weights.
        self._frozen = [
            distributed.make_frozen(model, ppo.forward_batch_size, ctx, config.distributed)
            for model in (load_causal_lm(sft_dir, tokenizer), load_reward_model(rm_dir, tokenizer.pad_token_id))
        ]
        self.reference, self.reward_model = (frozen.module for frozen in self._frozen)
        self.reward_stats = (
            read_json(rm_dir / "reward_stats.json") if (rm_dir / "reward_stats.json").is_file() else None
        )
        policy = load_causal_lm(sft_dir, tokenizer)
        critic = load_critic(rm_dir, sft_dir, tricks["critic_from_rm"], tokenizer.pad_token_id)
        clip = ppo.max_grad_norm if tricks["global_grad_clip"] else None
        self.policy = distributed.make_engine(
            policy,
            ppo_optim(ppo, ppo.policy_lr, clip, total_policy_steps, ctx.world_size),
            max(total_policy_steps, 1),
            ctx,
            config.distributed,
        )
        self.critic = distributed.make_engine(
            critic,
            ppo_optim(ppo, ppo.critic_lr, clip, total_critic_steps, ctx.world_size),
            total_critic_steps,
            ctx,
            config.distributed,
        )
        # Dropout off everywhere ("N implementation details" #13): log-probs of the rollout and of the update
        # must come from the same function, or the ratio is noise. Gradients flow in eval mode all the same.
        self.policy.unwrapped().eval()
        self.critic.unwrapped().eval()


def check_batch_sizes(ppo, world_size: int) -> None:
    """Rollout -> minibatches -> each process's micro-batches must divide exactly (bench/check_recipe.py checks a
    recipe with it too)."""
    if (
        ppo.rollout_size % ppo.minibatch_size
        or ppo.minibatch_size % world_size
        or (ppo.minibatch_size // world_size) % ppo.micro_batch_size
    ):
        raise ConfigError(
            f"ppo.rollout_size={ppo.rollout_size} must be a multiple of ppo.minibatch_size={ppo.minibatch_size}, "
            f"which must split evenly over {world_size} process(es) into micro-batches of "
            f"ppo.micro_batch_size={ppo.micro_batch_size}"
        )


def ppo_optim(ppo, lr: float, max_grad_norm: float | None, total_steps: int, world_size: int) -> OptimConfig:
    """One optimizer step per minibatch: micro-batches of ``ppo.micro_batch_size`` accumulate to it (the policy's
    and the critic's engine settings; bench/check_recipe.py validates them for a recipe)."""
    return OptimConfig(
        seed=ppo.seed,
        micro_batch_size=ppo.micro_batch_size,
        gradient_accumulation_steps=ppo.minibatch_size // world_size // ppo.micro_batch_size,
        lr=lr,
        lr_schedule=ppo.lr_schedule,
        warmup_ratio=min(ppo.warmup_steps / max(total_steps, 1), 0.99),
        min_lr_ratio=ppo.min_lr_ratio,
        weight_decay=ppo.weight_decay,
        adam_beta1=ppo.adam_beta1,
        adam_beta2=ppo.adam_beta2,
        adam_eps=ppo.adam_eps,
        max_grad_norm=max_grad_norm,
    )


def _global_mean(values: list[float] | torch.Tensor, weights=None) -> float:
    """Mean over all ranks of per-rank sums (``values`` summed locally, ``weights`` the counts)."""
    local = torch.tensor([float(sum(values)), float(len(values) if weights is None else weights)], dtype=torch.float64)
    total, count = distributed.all_reduce_sum(local).tolist()
    return total / max(count, 1.0)


def _global_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(count, mean, population var) of the masked entries over every rank."""
    m = mask.double()
    v = values.double() * m
    local = torch.stack([m.sum(), v.sum(), (v * v).sum()])
    count, total, total_sq = distributed.all_reduce_sum(local).tolist()
    return algo.moments_from_sums(count, total, total_sq)


class _Judge:
    """Gold-judge scores of rollouts on the simulated domain (monitoring only: nothing flows into training)."""

    def __init__(self, config: Config):
        self.judge = None
        if config.data.source == "sim":
            from rlhf_core.data.judge import GoldJudge
            from rlhf_core.data.sources import build_world

            self.judge = GoldJudge(build_world(config.data))

    def scores(self, prompts: list[str], responses: list[str]) -> list[float] | None:
        if self.judge is None:
            return None
        return [self.judge.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def train_ppo(config: Config, logger: Logger | None = None) -> TrainingResult:
    """Optimise the SFT policy against the reward model with PPO (preset and tricks from ``config.ppo``)."""
    logger = logger or NullLogger()
    started = time.time()
    ctx = distributed.setup(config.distributed)
    ppo = config.ppo
    tricks = ppo.resolved_tricks()
    out = Path(config.paths.ppo)
    data_dir = Path(config.paths.data)
    check_batch_sizes(ppo, ctx.world_size)
    distributed.seed_everything(ppo.seed + ctx.rank * 100_003)  # ranks sample different responses
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    prompts = [r["prompt"] for r in load_split(data_dir, "ppo", config.data)]
    sft_rows = load_split(data_dir, "sft_train", config.data) if tricks["ptx"] else []
    sft_examples = [(encode_query(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])) for r in sft_rows]

    warmup_iters = ppo.critic_warmup_steps if tricks["critic_warmup"] else 0
    if warmup_iters >= ppo.steps:
        raise ConfigError(f"ppo.critic_warmup_steps={warmup_iters} leaves no policy update in ppo.steps={ppo.steps}")
    minibatches = ppo.rollout_size // ppo.minibatch_size
    updates_per_iter = ppo.epochs * minibatches
    models = _Models(
        config, tokenizer, ctx, (ppo.steps - warmup_iters) * updates_per_iter, ppo.steps * updates_per_iter, tricks
    )
    judge = _Judge(config)
    moments = algo.RunningMoments()
    if models.reward_stats and (tricks["reward_norm"] or tricks["reward_scaling"]):
        # Calibrated from the first step: the RM's score statistics on SFT samples (rm stage).
        stats = models.reward_stats
        moments.merge(stats["count"], stats["mean"], stats["std"] ** 2)
    kl_ctl = (
        algo.AdaptiveKLController(tricks["kl_coef"], ppo.kl_target, ppo.kl_horizon)
        if tricks["kl_controller"] == "adaptive"
        else algo.FixedKLController(tricks["kl_coef"])
    )
    local_rollout = ppo.rollout_size // ctx.world_size
    local_minibatch = ppo.minibatch_size // ctx.world_size
    micro = ppo.micro_batch_size
    prompt_order = global_order(len(prompts), ppo.steps * ppo.rollout_size, ppo.seed)
    ptx_order = (
        global_order(len(sft_examples), ppo.steps * updates_per_iter * ppo.minibatch_size, ppo.seed + 1)
        if sft_examples
        else []
    )

    history: list[dict] = []
    samples: list[dict] = []
    monitor = {"warnings": 0, "first": None, "initial_length": None, "last_healthy": None}
    bad_in_a_row = 0
    start_step = 0
    engines = {"policy": models.policy, "critic": models.critic}
    checkpoint_root = out / "checkpoints"
    # Everything that shapes the run except where it logs and how long it runs: a checkpoint is resumed only by
    # the configuration that wrote it.
    dump = config.model_dump(exclude={"tracking": True, "ppo": {"resume", "steps", "stop_on_collapse"}})
    fingerprint = config_fingerprint(dump)
    existing = list_checkpoints(checkpoint_root, fingerprint) if ppo.resume == "auto" else []
    if existing:
        state = load_checkpoint(existing[-1], engines, ctx)
        start_step, history, samples = state["step"], state["history"], state["samples"]
        moments.load_state_dict(state["moments"])
        kl_ctl.load_state_dict(state["kl_controller"])
        monitor, bad_in_a_row = state["monitor"], state["bad_in_a_row"]
        if ctx.is_main:
            tqdm.write(f"ppo: resumed from {existing[-1]} (step {start_step})")
    elif ctx.is_main and checkpoint_root.exists():
        import shutil

        shutil.rmtree(checkpoint_root)  # a fresh run: stale checkpoints of another run must not be resumed later
    logger.log_params({f"ppo.resolved.{k}": v for k, v in tricks.items()})

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    progress = tqdm(
        range(start_step, ppo.steps),
        desc="ppo",
        disable=not ctx.is_main,
        dynamic_ncols=True,
        mininterval=2.0,
        initial=start_step,
        total=ppo.steps,
    )
    stopped_early = False
    for step in progress:
        record: dict = {"step": step + 1}
        # Wall time per phase (generation / scoring / training): where an iteration's time goes (bench/).
        phase_started = time.perf_counter()
        policy_module = models.policy.unwrapped()
        critic_module = models.critic.unwrapped()

        # 1. rollout ----------------------------------------------------------------------------------------
        take = prompt_order[step * ppo.rollout_size : (step + 1) * ppo.rollout_size]
        batch_prompts = [prompts[i] for i in take[ctx.rank * local_rollout : (ctx.rank + 1) * local_rollout]]
        query_ids, query_mask = left_pad([encode_query(tokenizer, p) for p in batch_prompts], pad_id)
        query_ids, query_mask = query_ids.to(ctx.device), query_mask.to(ctx.device)
        fb = ppo.forward_batch_size
        chunks = [
            sample(
                policy_module,
                tokenizer,
                query_ids[i : i + fb],
                query_mask[i : i + fb],
                ppo,
                config.data.max_response_tokens,
                models.synced_gpus,
            )
            for i in range(0, len(batch_prompts), fb)
        ]
        width = max(c.shape[1] for c in chunks)
        responses = pad_right(chunks, width, pad_id)
        response_mask = eos_response_mask(responses, eos_id)
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_id))
        ids = torch.cat([query_ids, responses], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        qw = query_ids.shape[1]
        record["time/generation"] = time.perf_counter() - phase_started
        phase_started = time.perf_counter()

        # 2. score: log-probs (sampling temperature), reference log-probs, values, RM scores ------------------
        with torch.no_grad():
            parts = {k: [] for k in ("logprobs", "ref_logprobs", "nll", "ref_nll", "entropy", "values", "scores")}
            for i in range(0, len(batch_prompts), fb):
                sl = slice(i, i + fb)
                logits = _response_logits(policy_module, ids[sl], mask[sl], qw, width)
                ref_logits = _response_logits(models.reference, ids[sl], mask[sl], qw, width)
                tokens = responses[sl]
                parts["logprobs"].append(algo.logprobs_from_logits(logits, tokens, ppo.temperature))
                parts["ref_logprobs"].append(algo.logprobs_from_logits(ref_logits, tokens, ppo.temperature))
                parts["nll"].append(-algo.logprobs_from_logits(logits, tokens))
                parts["ref_nll"].append(-algo.logprobs_from_logits(ref_logits, tokens))
                parts["entropy"].append(algo.entropy_from_logits(logits, ppo.temperature))
                values = critic_module(ids[sl], mask[sl], position_ids(mask[sl]))
                parts["values"].append(values[:, qw - 1 : qw - 1 + width].float())
                rm_logits = models.reward_model(
                    input_ids=ids[sl], attention_mask=mask[sl], position_ids=position_ids(mask[sl])
                ).logits
                parts["scores"].append(rm_logits.squeeze(-1).float())
        roll = {k: torch.cat(v) for k, v in parts.items()}
        rmask = response_mask.float()
        lengths = rmask.sum(dim=1)
        has_eos = (responses == eos_id).any(dim=1)
        raw_scores = roll["scores"]
        scores = raw_scores.clone()
        if ppo.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - ppo.missing_eos_penalty)

        # 3. reward processing: running moments of every score seen, normalise or scale, clip (eq. 18) -----------
        count, mean, var = _global_moments(scores.unsqueeze(1), torch.ones_like(scores).unsqueeze(1))
        moments.merge(count, mean, var)
        if tricks["reward_norm"]:
            scores = algo.normalize_scores(scores, moments.mean, moments.std)
        elif tricks["reward_scaling"]:
            scores = algo.scale_scores(scores, moments.std)
        if tricks["reward_clip"]:
            scores = algo.clip_scores(scores, ppo.reward_clip)

        # 4. KL-shaped per-token rewards (sec. 5.3.2) ------------------------------------------------------------
        kl = algo.kl_penalty(roll["logprobs"], roll["ref_logprobs"], tricks["kl_estimator"]) * rmask
        kl_coef = kl_ctl.value if tricks["kl_penalty"] else 0.0
        rewards = algo.kl_shaped_rewards(scores, kl, rmask, kl_coef)

        # 5. GAE ------------------------------------------------------------------------------------------------
        advantages, returns = algo.gae_advantages(rewards, roll["values"], rmask, ppo.gamma, ppo.lam)

        # Rollout metrics (global means over ranks).
        k1_per_seq = ((roll["logprobs"] - roll["ref_logprobs"]) * rmask).sum(dim=1)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        gold = judge.scores(batch_prompts, [t.strip() for t in texts])
        n_tokens = float(rmask.sum())
        record.update(
            {
                "objective/scores": _global_mean(raw_scores.tolist()),
                "objective/kl": _global_mean(k1_per_seq.tolist()),
                "objective/rlhf_reward": _global_mean((rewards * rmask).sum(dim=1).tolist()),
                "objective/entropy": _global_mean([float((roll["entropy"] * rmask).sum())], n_tokens),
                "rollout/response_length": _global_mean(lengths.tolist()),
                "rollout/eos_rate": _global_mean(has_eos.float().tolist()),
                "rollout/repetition": _global_mean(algo.repetition_rate(responses, response_mask).tolist()),
                "monitor/ppl_policy": math.exp(_global_mean([float((roll["nll"] * rmask).sum())], n_tokens)),
                "monitor/ppl_ref": math.exp(_global_mean([float((roll["ref_nll"] * rmask).sum())], n_tokens)),
                "reward/running_mean": moments.mean,
                "reward/running_std": moments.std,
                "objective/kl_coef": kl_coef,
            }
        )
        if gold is not None:
            record["monitor/gold_score"] = _global_mean(gold)
        kl_ctl.update(record["objective/kl"], ppo.rollout_size)
        record["time/scoring"] = time.perf_counter() - phase_started
        phase_started = time.perf_counter()

        # 6. epochs x minibatches ------------------------------------------------------------------------------
        train_policy = step >= warmup_iters
        sums: dict[str, list[float]] = {}
        for epoch in range(ppo.epochs):
            generator = torch.Generator().manual_seed(ppo.seed * 7_919 + step * 131 + epoch)
            permutation = torch.randperm(local_rollout, generator=generator)
            for m in range(minibatches):
                idx = permutation[m * local_minibatch : (m + 1) * local_minibatch]
                mb_mask = rmask[idx]
                mb_adv = advantages[idx]
                if tricks["advantage_norm"]:
                    _, adv_mean, adv_var = _global_moments(mb_adv, mb_mask)
                    mb_adv = (mb_adv - adv_mean) * torch.rsqrt(torch.tensor(adv_var + 1e-8)) * mb_mask
                if tricks["advantage_clip"]:
                    mb_adv = algo.clip_advantages(mb_adv, ppo.advantage_clip)
                bad = False  # a non-finite loss or gradient in this minibatch (its update is skipped)
                for j in range(0, local_minibatch, micro):
                    chunk, c_mask, c_adv = idx[j : j + micro], mb_mask[j : j + micro], mb_adv[j : j + micro]
                    losses = {}
                    if train_policy:
                        with models.policy.autocast():
                            logits = _response_logits(models.policy.forward, ids[chunk], mask[chunk], qw, width)
                        new_logprobs = algo.logprobs_from_logits(logits, responses[chunk], ppo.temperature)
                        pg_loss, pg_stats = algo.policy_loss(
                            new_logprobs,
                            roll["logprobs"][chunk],
                            c_adv,
                            c_mask,
                            ppo.cliprange,
                            tricks["policy_loss_clip"],
                        )
                        total = pg_loss
                        if tricks["entropy_bonus"]:
                            entropy = algo.entropy_from_logits(logits, ppo.temperature)
                            total = total + ppo.entropy_coef * algo.entropy_loss(entropy, c_mask)[0]
                        if tricks["ptx"]:
                            # The u-th policy update takes the u-th global batch of demonstrations, sliced like the
                            # rollout: this rank's share, then this micro-batch's part of it.
                            u = (step - warmup_iters) * updates_per_iter + epoch * minibatches + m
                            chosen = ptx_order[u * ppo.minibatch_size : (u + 1) * ppo.minibatch_size]
                            mine = chosen[ctx.rank * local_minibatch : (ctx.rank + 1) * local_minibatch][j : j + micro]
                            batch = collate_sft([sft_examples[i] for i in mine], pad_id)
                            batch = {k: v.to(ctx.device) for k, v in batch.items()}
                            with models.policy.autocast():
                                ptx_logits = models.policy.forward(
                                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                ).logits
                            ptx, _ = sft_loss(ptx_logits.float(), batch["labels"])
                            total = total + ppo.ptx_coef * ptx
                            losses["loss/ptx"] = float(ptx.detach())
                        losses.update(
                            {
                                "loss/policy": float(pg_loss.detach()),
                                "policy/approxkl": float(pg_stats["approxkl"]),
                                "policy/clipfrac": float(pg_stats["clipfrac"]),
                                "policy/ratio_mean": float(pg_stats["ratio_mean"]),
                            }
                        )
                        bad |= _backward_and_step(models.policy, total)
                        if models.policy.last_grad_norm is not None and j + micro >= local_minibatch:
                            losses["policy/grad_norm"] = models.policy.last_grad_norm
                    with models.critic.autocast():
                        values = models.critic.forward(
                            input_ids=ids[chunk], attention_mask=mask[chunk], position_ids=position_ids(mask[chunk])
                        )
                    new_values = values[:, qw - 1 : qw - 1 + width].float()
                    vf_loss, vf_stats = algo.value_loss(
                        new_values,
                        roll["values"][chunk],
                        returns[chunk],
                        c_mask,
                        ppo.cliprange_value,
                        tricks["value_loss_clip"],
                    )
                    bad |= _backward_and_step(models.critic, ppo.vf_coef * vf_loss)
                    losses.update({"loss/value": float(vf_loss.detach()), "val/clipfrac": float(vf_stats["clipfrac"])})
                    for key, value in losses.items():
                        sums.setdefault(key, []).append(value)
                bad_in_a_row = bad_in_a_row + 1 if bad else 0
                if bad_in_a_row >= ppo.max_bad_steps:
                    last = list_checkpoints(checkpoint_root)
                    raise RLHFError(
                        f"ppo: {bad_in_a_row} non-finite updates in a row at iteration {step + 1}; stopping. "
                        f"Last good checkpoint: {last[-1] if last else 'none'} (lower ppo.policy_lr / critic_lr?)"
                    )
        record.update({k: _global_mean(v) for k, v in sums.items()})
        if "loss/policy" in record:
            record["loss/total"] = (
                record["loss/policy"] + ppo.vf_coef * record["loss/value"] + ppo.ptx_coef * record.get("loss/ptx", 0.0)
            )
        record["policy/lr"] = models.policy.current_lr()
        record["critic/lr"] = models.critic.current_lr()
        record["ppo/skipped_updates"] = models.policy.skipped_steps + models.critic.skipped_steps
        record["time/training"] = time.perf_counter() - phase_started

        # Collapse monitor: the paper's early signals (sec. 5.2) --------------------------------------------------
        reasons = _collapse_reasons(record, monitor, ppo)
        if reasons:
            monitor["warnings"] += 1
            if monitor["first"] is None:
                monitor["first"] = f"iteration {step + 1}: {'; '.join(reasons)}"
                logger.set_tags({"collapse_warning": monitor["first"]})
            if ctx.is_main:
                tqdm.write(f"ppo: collapse warning at iteration {step + 1}: {'; '.join(reasons)}")
        record["monitor/collapse_warnings"] = monitor["warnings"]
        history.append(record)
        logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
        if (step + 1) % ppo.sample_every == 0 or step == start_step:
            for j in range(min(4, len(batch_prompts))):
                samples.append(
                    {
                        "step": step + 1,
                        "prompt": batch_prompts[j],
                        "response": texts[j].strip(),
                        "score": float(raw_scores[j]),
                        **({"gold_score": gold[j]} if gold is not None else {}),
                    }
                )
        progress.set_postfix(
            score=f"{record['objective/scores']:.2f}",
            kl=f"{record['objective/kl']:.2f}",
            len=f"{record['rollout/response_length']:.0f}",
        )
        if reasons and ppo.stop_on_collapse:
            stopped_early = True
            break
        if not reasons:
            monitor["last_healthy"] = step + 1
        if (step + 1) % ppo.checkpoint_every == 0 and step + 1 < ppo.steps:
            trainer_state = {
                "step": step + 1,
                "history": history,
                "samples": samples,
                "moments": moments.state_dict(),
                "kl_controller": kl_ctl.state_dict(),
                "monitor": monitor,
                "bad_in_a_row": bad_in_a_row,
            }
            save_checkpoint(checkpoint_root, step + 1, engines, trainer_state, ctx, fingerprint)

    if stopped_early:
        healthy = list_checkpoints(checkpoint_root, fingerprint)
        if healthy:
            load_checkpoint(healthy[-1], {"policy": models.policy}, ctx)  # keep the last healthy policy
    state = distributed.gather_full_state_dict(models.policy)
    model_dir = out / "model"
    metrics: dict = {}
    if ctx.is_main:
        with atomic_directory(model_dir) as tmp:
            models.policy.unwrapped().save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    if ctx.is_main or models.sharded:
        # Sharded models answer only when every rank runs the same forwards: then every rank evaluates the same
        # prompts from the same seed (what rank 0 alone computes otherwise), and rank 0 reports.
        comparison = _eval_comparison(
            config,
            models.policy.unwrapped(),
            models.reference,
            models.reward_model,
            tokenizer,
            judge,
            ctx.device,
            models.synced_gpus,
        )
    if ctx.is_main:
        tail = history[-min(5, len(history)) :]
        keys = [
            "objective/scores",
            "objective/kl",
            "objective/rlhf_reward",
            "rollout/response_length",
            "rollout/eos_rate",
            "rollout/repetition",
            "monitor/ppl_policy",
            "monitor/ppl_ref",
            "monitor/gold_score",
        ]
        metrics = {f"ppo/{k.replace('/', '_')}": sum(r[k] for r in tail) / len(tail) for k in keys if k in tail[0]}
        metrics.update(
            {
                "ppo/steps": len(history),
                "ppo/collapse_warnings": monitor["warnings"],
                "ppo/stopped_early": int(stopped_early),
                "ppo/skipped_updates": history[-1]["ppo/skipped_updates"],
                **comparison,
                "ppo/seconds": round(time.time() - started, 2),
            }
        )
        atomic_write_json(
            out / "tricks.json", {"preset": ppo.preset, **tricks, "first_collapse_warning": monitor["first"]}
        )
        atomic_write_jsonl(out / "samples.jsonl", samples)
        atomic_write_json(out / "metrics.json", metrics)
        save_config(config, out / "config.yaml")
        _write_plots(out / "plots", history)
        logger.log_metrics({k: v for k, v in metrics.items() if k != "ppo/seconds"})
        for name in ("metrics.json", "tricks.json", "samples.jsonl", "config.yaml"):
            logger.log_artifact(out / name, None)
        logger.log_artifact(out / "plots", "plots")
        logger.register_model(model_dir, config.tracking.registered_model)
    distributed.barrier()
    return TrainingResult(out, model_dir, out / "metrics.json", metrics, history)


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    half = 1.959964 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@torch.no_grad()
def _eval_comparison(
    config: Config, policy, reference, reward_model, tokenizer, judge: _Judge, device, synced_gpus: bool
) -> dict:
    """RM and gold scores of the SFT policy and the PPO policy on the held-out ``eval`` prompts, sampled with the
    paper's evaluation settings (``eval.*``) from the same seed; means with 95% intervals."""
    prompts = [r["prompt"] for r in load_split(config.paths.data, "eval", config.data)]
    out: dict = {}
    for name, model in (("sft", reference), ("policy", policy)):
        got = sample_responses(
            model,
            tokenizer,
            prompts,
            config.eval,
            config.data.max_response_tokens,
            config.eval.seed,
            device,
            synced_gpus=synced_gpus,
        )
        response_mask, texts = got["response_mask"], got["texts"]
        rm = score_samples(reward_model, got)
        mean, low, high = _mean_ci(rm.float().tolist())
        out.update({f"ppo/eval_rm_score_{name}": mean, f"ppo/eval_rm_score_{name}_ci_low": low,
                    f"ppo/eval_rm_score_{name}_ci_high": high})  # fmt: skip
        out[f"ppo/eval_response_length_{name}"] = float(response_mask.sum(1).float().mean())
        gold = judge.scores(prompts, texts)
        if gold is not None:
            mean, low, high = _mean_ci(gold)
            out.update({f"ppo/eval_gold_score_{name}": mean, f"ppo/eval_gold_score_{name}_ci_low": low,
                        f"ppo/eval_gold_score_{name}_ci_high": high})  # fmt: skip
            out[f"_gold_{name}"] = gold
    if "_gold_sft" in out:
        diffs = [a - b for a, b in zip(out.pop("_gold_policy"), out.pop("_gold_sft"), strict=True)]
        mean, low, high = _mean_ci(diffs)
        out.update({"ppo/eval_gold_gain": mean, "ppo/eval_gold_gain_ci_low": low, "ppo/eval_gold_gain_ci_high": high})
    out["ppo/eval_prompts"] = len(prompts)
    return out


def _backward_and_step(engine, loss: torch.Tensor) -> bool:
    """Backward one micro-batch and count it (the engine steps at the accumulation boundary). True when the loss
    or the update's gradient was non-finite, i.e. the update is (or will be) skipped.

    The torch engine drops a whole update whose gradient norm is non-finite, so a NaN loss may flow into it and
    poisons exactly that update. DeepSpeed would apply NaN gradients, so there the bad micro-batch is left out
    and the update applies the finite rest of the minibatch.
    """
    finite = _finite_everywhere(loss)
    skipped_before = engine.skipped_steps
    if finite or isinstance(engine, distributed.TorchEngine):
        engine.backward(loss)
    engine.step()
    return not finite or engine.skipped_steps > skipped_before


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (ranks must agree to skip, or collectives would hang)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0)
    return float(distributed.all_reduce_sum(bad)) == 0.0


def _collapse_reasons(record: dict, monitor: dict, ppo) -> list[str]:
    """The paper's collapse signals (sec. 5.2, fig. 4): KL to the SFT model, response length, perplexity."""
    length = record["rollout/response_length"]
    if monitor["initial_length"] is None:
        monitor["initial_length"] = length
    reasons = []
    if record["objective/kl"] > ppo.collapse_kl:
        reasons.append(f"KL {record['objective/kl']:.2f} > ppo.collapse_kl={ppo.collapse_kl}")
    first = monitor["initial_length"]
    if length > first * ppo.collapse_length_ratio or length < first / ppo.collapse_length_ratio:
        reasons.append(f"response length {length:.1f} vs {first:.1f} at the start")
    if record["monitor/ppl_policy"] < ppo.collapse_ppl_ratio * record["monitor/ppl_ref"]:
        reasons.append(
            f"policy perplexity {record['monitor/ppl_policy']:.2f} < {ppo.collapse_ppl_ratio} x reference "
            f"{record['monitor/ppl_ref']:.2f}"
        )
    return reasons


PLOT_KEYS = [
    ("objective/scores", "RM score"),
    ("monitor/gold_score", "gold score (sim)"),
    ("objective/kl", "KL to SFT (nats/seq)"),
    ("rollout/response_length", "response length (tokens)"),
    (("monitor/ppl_policy", "monitor/ppl_ref"), "perplexity: policy vs SFT"),
    ("loss/value", "value loss"),
]


def _write_plots(directory: Path, history: list[dict]) -> None:
    """``train.csv`` (every metric, for DVC plots) and ``ppo_curves.png`` (the paper's collapse signals)."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf_core.io import atomic_write_text

    keys = sorted({k for r in history for k in r if k != "step"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(directory / "train.csv", buffer.getvalue())

    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=100)
    steps = [r["step"] for r in history]
    for ax, (key, title) in zip(axes.flat, PLOT_KEYS, strict=True):
        for k in key if isinstance(key, tuple) else (key,):
            ys = [r.get(k, float("nan")) for r in history]
            ax.plot(steps, ys, label=k.split("/")[-1])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if isinstance(key, tuple):
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("PPO iteration")
    fig.tight_layout()
    save_figure(fig, directory / "ppo_curves.png")

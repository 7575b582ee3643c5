"""The `rm` stage: reward-model training on preference pairs (paper sec. 4.1, eq. 2).

Outputs (committed to ``paths.rm`` by the stage scaffold, which adds ``metrics.json`` and ``config.yaml``):
``model/`` (the best checkpoint as a Hugging Face sequence-classification directory, ``num_labels=1``, with its
model card and ``reward_stats.json``: the mean and std of its scores on SFT-policy samples for PPO prompts),
``checkpoints.json`` (validation metrics of every evaluation and which were saved) and ``plots/``. The best
checkpoint is written into the stage's uncommitted directory while training, so an interrupted run never leaves a
half-trained model behind.

Loss per global batch of pairs: ``mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean(r^2)
+ beta_rm * (token-mean NLL of the chosen responses)``. The data-parallel contract is the SFT stage's: every
rank draws the same order and takes its own micro-batches of each global batch; the LM term is normalised by
the chosen-response tokens of the whole global batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.algos.rm import pairwise_loss, score_length_fit
from rlhf_core.algos.sft import first_labelled_logit, sft_loss
from rlhf_core.config import Config, steps_for
from rlhf_core.data.limits import response_token_limit
from rlhf_core.data.order import global_order, rank_batches
from rlhf_core.data.rows import load_split
from rlhf_core.data.tokenize import collate_sft, encode_query, encode_response, eos_response_mask, left_pad
from rlhf_core.errors import DataError
from rlhf_core.io import atomic_write_json
from rlhf_core.model_card import write_model_card
from rlhf_core.models.generation import sample
from rlhf_core.models.lora import apply_lora, is_lora, merged
from rlhf_core.models.reward import load_reward_model, reward_model_for_training, save_reward_model, score_padded
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.plots import write_curves
from rlhf_core.tracking import Logger
from rlhf_core.trainers.micro_batches import length_groups, positions_per_token
from rlhf_core.trainers.results import StageResult

Pair = tuple[list[int], list[int], list[int]]  # (query ids, chosen response ids, rejected response ids)


def encode_pairs(tokenizer, rows: list[dict]) -> list[Pair]:
    return [
        (
            encode_query(tokenizer, r["prompt"]),
            encode_response(tokenizer, r["chosen"]),
            encode_response(tokenizer, r["rejected"]),
        )
        for r in rows
    ]


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``2B`` sequences: the B chosen rows first, then the B rejected ones; labels mark the
    response tokens (the LM term reads those of the chosen half)."""
    return collate_sft([(q, c) for q, c, _ in pairs] + [(q, r) for q, _, r in pairs], pad_id)


def split_train_val(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, prompt-disjoint hold-out of ``rm_train`` (at least one pair on each side)."""
    if len(rows) < 2:
        raise DataError(f"rm_train has {len(rows)} pair(s); the reward model needs at least 2 (train + validation)")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    val_ids = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_ids], [r for i, r in enumerate(rows) if i in val_ids]


def mismatched_pairs(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """Extra pairs that prefer a prompt's own chosen response to the chosen response of another prompt.

    A reward model that scores a fluent answer without checking that it answers *this* prompt is the opening
    PPO finds first (an off-topic answer collects a high reward). These pairs, ``fraction`` x len(rows) of
    them, teach the relation directly; pairs whose two texts are equal (e.g. the same refusal) are not made.
    """
    count = round(fraction * len(rows))
    if count == 0 or len(rows) < 2:
        return []
    generator = torch.Generator().manual_seed(seed)
    own = torch.randint(len(rows), (count,), generator=generator).tolist()  # host: data order
    shift = torch.randint(1, len(rows), (count,), generator=generator).tolist()  # host: never the row itself
    extra = []
    for i, k in zip(own, shift, strict=True):
        row, other = rows[i], rows[(i + k) % len(rows)]
        if other["prompt"] != row["prompt"] and other["chosen"].strip() != row["chosen"].strip():
            extra.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": other["chosen"]})
    return extra


def _to_device(engine, pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    return {k: v.to(engine.device) for k, v in collate_pairs(pairs, pad_id).items()}


@torch.no_grad()
def validate(engine, pairs: list[Pair], micro: int, pad_id: int, ctx) -> dict[str, float]:
    """Ranking loss, accuracy and score gap over ``pairs`` (sharded over ranks, reduced globally)."""
    engine.module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # host: loss, correct, gap, pairs
    for chunk, is_filler in rank_batches(pairs, micro, ctx.rank, ctx.world_size):
        batch, n = _to_device(engine, chunk, pad_id), len(chunk)
        with engine.autocast():
            scores, _ = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if is_filler:
            continue
        scores = scores.float()
        loss, stats = pairwise_loss(scores[:n], scores[n:])
        sums += torch.tensor(  # host: metric sums
            [float(loss) * n, float(stats["accuracy"]) * n, float(stats["score_gap"]) * n, n]
        )
    engine.module.train()
    loss, correct, gap, count = distributed.all_reduce_sum(sums).tolist()
    return {"rm/val_loss": loss / count, "rm/val_accuracy": correct / count, "rm/val_score_gap": gap / count}


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


@torch.no_grad()
def reward_statistics(config: Config, rm_dir: Path, tokenizer, ctx) -> dict:
    """Mean and std of the reward model's scores on SFT-policy answers to PPO prompts (sampled with PPO's
    temperature, top-p and repetition penalty), so PPO can normalise rewards from its first step."""
    from rlhf_core.models.causal_lm import load_causal_lm

    prompts = [r["prompt"] for r in load_split(config.paths.data, "ppo", config.data)]
    prompts = prompts[: config.rm.reward_stats_prompts][ctx.rank :: ctx.world_size]
    policy = distributed.place(load_causal_lm(Path(config.paths.sft) / "model", tokenizer))
    reward_model = distributed.place(load_reward_model(rm_dir, tokenizer.pad_token_id))
    generator_seed = config.rm.seed * 1_000_003 + ctx.rank
    # n, sum L, sum L^2, sum s, sum s^2, sum s*L of score s and response length L (algos.rm.score_length_fit)
    sums = torch.zeros(6, dtype=torch.float64)  # host: score sums
    batch_size = config.rm_eval.batch_size
    with torch.random.fork_rng():
        torch.manual_seed(generator_seed)
        for start in range(0, len(prompts), batch_size):
            queries = [encode_query(tokenizer, p) for p in prompts[start : start + batch_size]]
            input_ids, attention_mask = (t.to(policy.device) for t in left_pad(queries, tokenizer.pad_token_id))
            responses = sample(
                policy,
                tokenizer,
                input_ids,
                attention_mask,
                config.ppo.sampling,
                response_token_limit(config),
                engine=config.generation,
            )
            output = torch.cat([input_ids, responses], dim=1)
            # Scored as PPO will: query + response as generated (left-padded; the head reads the last real token).
            response_mask = eos_response_mask(responses, tokenizer.eos_token_id)
            full_mask = torch.cat([attention_mask, response_mask], 1)
            scores = score_padded(reward_model, output, full_mask).double().cpu()
            lengths = response_mask.sum(1).double().cpu()  # as PPO counts a rollout's response tokens
            count = torch.tensor(float(len(scores)))  # host: score sums
            sums += torch.stack([count, lengths.sum(), lengths.pow(2).sum(), scores.sum(), scores.pow(2).sum(),
                                 (scores * lengths).sum()])  # fmt: skip
    count, _, _, total, total_sq, _ = sums_all = distributed.all_reduce_sum(sums).tolist()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    return {
        "mean": mean,
        "std": std,
        "count": int(count),
        # The score's linear dependence on length (ppo.length_debias removes it from PPO's reward).
        "length": score_length_fit(sums_all),
        "policy": str(Path(config.paths.sft) / "model"),
        "prompts": "ppo split, first rm.reward_stats_prompts",
        "sampling": {**config.ppo.sampling.model_dump(), "max_new_tokens": response_token_limit(config)},
    }


def train_reward_model(config: Config, out: Path, logger: Logger) -> StageResult:
    """Train the reward model on ``rm_train`` (minus a validation hold-out); keep the best checkpoint in ``out``."""
    ctx = distributed.setup(config.distributed)
    distributed.seed_everything(config.rm.seed)
    opt = config.rm
    data_dir = Path(config.paths.data)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    pad_id = tokenizer.pad_token_id
    train_rows, val_rows = split_train_val(load_split(data_dir, "rm_train", config.data), opt.val_fraction, opt.seed)
    train_rows = train_rows + mismatched_pairs(train_rows, opt.mismatch_fraction, opt.seed)
    train, val = encode_pairs(tokenizer, train_rows), encode_pairs(tokenizer, val_rows)
    global_batch, total_steps = steps_for(len(train), opt, ctx.world_size)

    init_from = opt.init_from or str(Path(config.paths.sft) / "model")
    role = "rm.init_from" if opt.init_from else None
    model = apply_lora(reward_model_for_training(init_from, pad_id, with_lm_head=opt.beta_rm > 0, role=role),
                       config.model.lora, heads=("score",))  # fmt: skip
    engine = distributed.make_engine(
        model, opt, total_steps, ctx, config.distributed, opt.micro_batch_size, opt.gradient_accumulation_steps
    )
    order = global_order(len(train), total_steps * global_batch, opt.seed)
    local = opt.gradient_accumulation_steps * opt.micro_batch_size  # this rank's share of a global batch
    model_dir = out / "model"

    history: list[dict] = []
    checkpoints: list[dict] = []
    best: float | None = None
    progress = tqdm(range(total_steps), desc="rm", disable=not ctx.is_main, dynamic_ncols=True, mininterval=2.0)
    for step in progress:
        batch_ids = order[step * global_batch : (step + 1) * global_batch]
        mine = [train[i] for i in batch_ids[ctx.rank * local : (ctx.rank + 1) * local]]
        record = {"step": step + 1, **_train_step(engine, mine, opt, pad_id, ctx)}
        history.append(record)
        logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
        if (step + 1) % opt.eval_every == 0 or step + 1 == total_steps:
            val_metrics = validate(engine, val, config.rm_eval.batch_size, pad_id, ctx)
            value = val_metrics[f"rm/val_{opt.best_metric}"]
            saved = _is_better(opt.best_metric, value, best)
            if saved:
                best = value
                _save_best(engine, tokenizer, model_dir, ctx)
            checkpoints.append({"step": step + 1, **val_metrics, "saved": saved})
            logger.log_metrics(val_metrics, step=step + 1)
            progress.set_postfix(acc=f"{record['rm/accuracy']:.2f}", val_acc=f"{val_metrics['rm/val_accuracy']:.3f}")

    distributed.barrier()
    reward_stats = reward_statistics(config, model_dir, tokenizer, ctx)
    metrics: dict = {}
    if ctx.is_main:
        atomic_write_json(model_dir / "reward_stats.json", reward_stats)
        sizes = {"rm/steps": total_steps, "rm/global_batch": global_batch, "rm/train_pairs": len(train),
                 "rm/val_pairs": len(val)}  # fmt: skip
        metrics = _summary(history, checkpoints, reward_stats, sizes)
        write_model_card(model_dir, config, "rm", metrics)
        atomic_write_json(out / "checkpoints.json", checkpoints)
        write_curves(out / "plots", "rm", history, checkpoints, [("rm/loss", "rm/val_loss", "ranking loss (nats/pair)"),
                     ("rm/accuracy", "rm/val_accuracy", "pairwise accuracy")])  # fmt: skip
    distributed.barrier()
    return StageResult(
        metrics=metrics,
        artifacts={"model": "model", "metrics": "metrics.json"},
        logged=("checkpoints.json", "plots", "model/reward_stats.json"),
        history=history,
    )


def _save_best(engine, tokenizer, model_dir: Path, ctx) -> None:
    """The reward model as it is now, merged if it trains LoRA adapters. Every rank takes part (ZeRO-3 gathers
    shards); rank 0 writes."""
    module = engine.unwrapped()
    if is_lora(module):
        template = merged(module)
        state = template.state_dict()
    else:
        template, state = module, distributed.gather_full_state_dict(engine)
    if ctx.is_main:
        save_reward_model(state, template, tokenizer, model_dir)


def _train_step(engine, pairs: list[Pair], opt, pad_id: int, ctx) -> dict[str, float]:
    """One optimizer step on this rank's ``pairs`` of a global batch (eq. 2: ranking loss + beta_rm x LM loss on
    the chosen responses); the batch's metrics, reduced over every rank. Micro-batches of ``micro_batch_size``
    pairs, or grouped by length within ``rm.max_tokens_per_micro_batch`` positions (both sequences of a pair)."""
    lengths = [len(q) + max(len(c), len(r)) for q, c, r in pairs]
    groups = length_groups(list(range(len(pairs))), lengths, opt.max_tokens_per_micro_batch, opt.micro_batch_size,
                           "rm.max_tokens_per_micro_batch", sequences=2)  # fmt: skip
    batches = [(len(g), _to_device(engine, [pairs[i] for i in g], pad_id)) for g in groups]
    local_tokens = sum(int((b["labels"][:n, 1:] != -100).sum()) for n, b in batches)
    global_tokens = float(distributed.all_reduce_sum(torch.tensor(float(local_tokens))))  # host: a count
    # As in SFT: after the engine divides by the accumulation and averages ranks, the LM term is the token mean
    # over the chosen responses of the whole global batch; the ranking terms, means over a micro-batch's pairs,
    # are weighted by its share of the pairs (exactly 1 for micro-batches of micro_batch_size pairs).
    accumulated = opt.gradient_accumulation_steps * ctx.world_size
    normaliser = global_tokens / accumulated
    pairs_per_share = float(distributed.all_reduce_sum(torch.tensor(float(len(pairs))))) / accumulated  # host: a count
    sums = torch.zeros(5, dtype=torch.float64)  # host: ranking loss, correct, gap, pairs, chosen nll
    for j, (n, batch) in enumerate(batches):
        engine.set_boundary(j == len(batches) - 1)  # the count follows the budget
        lm_from = first_labelled_logit(batch["labels"][:n])  # the LM head on the chosen responses only
        with engine.autocast():
            scores, logits = engine.forward(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                lm_rows=n if opt.beta_rm > 0 else 0,
                lm_from=lm_from,
            )
        scores = scores.float()
        rank_loss, stats = pairwise_loss(scores[:n], scores[n:], margin=opt.margin, center_coef=opt.center_coef)
        loss = rank_loss * (n / pairs_per_share)
        nll = 0.0
        if logits is not None:
            lm_loss, lm_stats = sft_loss(logits.float(), batch["labels"][:n, lm_from:], normaliser=normaliser)
            loss = loss + opt.beta_rm * lm_loss
            nll = float(lm_stats["nll_sum"])
        engine.backward(loss)
        engine.step()
        sums += torch.tensor(  # host: metric sums
            [float(rank_loss.detach()) * n, float(stats["accuracy"]) * n, float(stats["score_gap"]) * n, n, nll]
        )
    rank_sum, correct, gap, count, nll_sum = distributed.all_reduce_sum(sums).tolist()
    record = {
        "rm/loss": rank_sum / count,
        "rm/accuracy": correct / count,
        "rm/score_gap": gap / count,
        "rm/lr": engine.current_lr(),
        "rm/positions_per_token": positions_per_token([b["attention_mask"] for _, b in batches]),
    }
    if opt.beta_rm > 0:
        record["rm/lm_loss"] = nll_sum / global_tokens
    if engine.last_grad_norm is not None:
        record["rm/grad_norm"] = engine.last_grad_norm
    return record


def _summary(history: list[dict], checkpoints: list[dict], reward_stats: dict, sizes: dict) -> dict:
    """metrics.json: the last steps' training metrics, the kept checkpoint's validation and the reward statistics."""
    best = [c for c in checkpoints if c["saved"]][-1]
    tail = history[-min(10, len(history)) :]
    return {
        "rm/loss": sum(r["rm/loss"] for r in tail) / len(tail),
        "rm/accuracy": sum(r["rm/accuracy"] for r in tail) / len(tail),
        "rm/val_loss": best["rm/val_loss"],
        "rm/val_accuracy": best["rm/val_accuracy"],
        "rm/val_score_gap": best["rm/val_score_gap"],
        "rm/best_step": best["step"],
        "rm/reward_mean": reward_stats["mean"],
        "rm/reward_std": reward_stats["std"],
        "rm/reward_length_slope": reward_stats["length"]["slope"],
        "rm/reward_length_correlation": reward_stats["length"]["correlation"],
        **sizes,
    }

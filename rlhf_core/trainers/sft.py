"""The `sft` stage: supervised fine-tuning of the policy on demonstrations (loss on response tokens only).

Outputs (committed to ``paths.sft`` by the stage scaffold, which adds ``metrics.json`` and ``config.yaml``):
``model/`` (a Hugging Face directory ``AutoModelForCausalLM`` loads, with its model card), ``plots/`` (loss curves
as CSV for DVC and a PNG) and ``samples.jsonl`` (greedy answers to validation prompts).

Data-parallel contract: every rank draws the same shuffled order; one optimizer step consumes a global batch of
``micro_batch_size x gradient_accumulation_steps x world_size`` examples, and rank r takes its own
``gradient_accumulation_steps`` micro-batches of it. The loss is normalised by the response-token count of the
whole global batch, so 2 processes x 1 micro-batch reproduce 1 process x 2 micro-batches (a test).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.algos.sft import first_labelled_logit, sft_loss
from rlhf_core.config import Config, steps_for
from rlhf_core.data.limits import response_token_limit
from rlhf_core.data.order import global_order, rank_batches
from rlhf_core.data.rows import load_split
from rlhf_core.data.tokenize import collate_sft, encode_query, encode_response, left_pad
from rlhf_core.io import atomic_write_jsonl
from rlhf_core.model_card import write_model_card
from rlhf_core.models.causal_lm import initial_policy, load_causal_lm
from rlhf_core.models.generation import sample
from rlhf_core.models.lora import apply_lora, is_lora, save_causal_lm
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.plots import write_curves
from rlhf_core.tracking import Logger
from rlhf_core.trainers.micro_batches import length_groups, positions_per_token
from rlhf_core.trainers.results import StageResult


def _encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(encode_query(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])) for r in rows]


def _labelled_logits(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits from the first position that predicts a response token on, and the labels aligned with them."""
    start = first_labelled_logit(batch["labels"])
    width = batch["labels"].shape[1]
    with engine.autocast():
        logits = engine.forward(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=width - start
        ).logits
    return logits, batch["labels"][:, start:]


@torch.no_grad()
def evaluate_loss(engine, examples, micro_batch_size: int, pad_id: int, ctx) -> float:
    """Token-mean response NLL over ``examples`` (sharded over ranks, summed globally)."""
    engine.module.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)  # host: metric sums
    tokens = torch.zeros((), dtype=torch.float64)  # host: metric sums
    for chunk, is_filler in rank_batches(examples, micro_batch_size, ctx.rank, ctx.world_size):
        batch = {k: v.to(engine.device) for k, v in collate_sft(chunk, pad_id).items()}
        logits, labels = _labelled_logits(engine, batch)
        if is_filler:
            continue
        _, stats = sft_loss(logits, labels)
        nll_sum += stats["nll_sum"].double().cpu()
        tokens += stats["tokens"].double().cpu()
    engine.module.train()
    return float(distributed.all_reduce_sum(nll_sum) / distributed.all_reduce_sum(tokens))


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32, engine=None
) -> list[str]:
    model.eval()
    responses = []
    for start in range(0, len(prompts), batch_size):
        queries = [encode_query(tokenizer, p) for p in prompts[start : start + batch_size]]
        input_ids, attention_mask = (t.to(model.device) for t in left_pad(queries, tokenizer.pad_token_id))
        output = sample(model, tokenizer, input_ids, attention_mask, None, max_new_tokens, engine=engine)
        responses += tokenizer.batch_decode(output, skip_special_tokens=True)
    return [r.strip() for r in responses]


def _sample_generations(config: Config, model_dir: Path, tokenizer, val_rows: list[dict]) -> tuple[list, dict]:
    """Greedy answers of the saved policy to validation prompts; gold-judged on the simulated domain."""
    rows = val_rows[: config.sft.num_sample_generations]
    if not rows:
        return [], {}
    model = distributed.place(load_causal_lm(model_dir))
    responses = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], response_token_limit(config),
                                engine=config.generation)  # fmt: skip
    samples = [
        {
            "prompt": r["prompt"],
            "response": resp,
            "reference": r["response"],
            **({"category": r["category"]} if "category" in r else {}),
        }
        for r, resp in zip(rows, responses, strict=True)
    ]
    metrics = {}
    if config.data.source == "sim":
        # Evaluation only: the gold judge scores what the policy wrote; nothing flows back into training.
        from rlhf_core.data.judge import GoldJudge
        from rlhf_core.data.sources import build_world

        judge = GoldJudge(build_world(config.data))
        verdicts = [judge.judge(s["prompt"], s["response"]) for s in samples]
        for sample, verdict in zip(samples, verdicts, strict=True):
            sample["gold_score"], sample["gold_outcome"] = verdict.score, verdict.outcome
        metrics["sft/sample_gold_score"] = sum(v.score for v in verdicts) / len(verdicts)
        metrics["sft/sample_flawless_rate"] = sum(v.flawless for v in verdicts) / len(verdicts)
    return samples, metrics


def _train_step(engine, examples: list[tuple[list[int], list[int]]], opt, pad_id: int, ctx) -> dict[str, float]:
    """One optimizer step on this rank's ``examples`` of a global batch, in micro-batches (``micro_batch_size``
    examples, or grouped by length within ``sft.max_tokens_per_micro_batch`` positions); the batch's loss (token
    mean over every rank), learning rate, token count, positions computed per real token and gradient norm."""
    lengths = [len(q) + len(r) for q, r in examples]
    groups = length_groups(list(range(len(examples))), lengths, opt.max_tokens_per_micro_batch, opt.micro_batch_size,
                           "sft.max_tokens_per_micro_batch")  # fmt: skip
    micro_batches = [collate_sft([examples[i] for i in g], pad_id) for g in groups]
    local_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    global_tokens = float(distributed.all_reduce_sum(torch.tensor(float(local_tokens))))  # host: a count
    # Scaled so that after the engine divides by the accumulation and averages over ranks, the gradient is that of
    # the token mean over the whole global batch.
    normaliser = global_tokens / (opt.gradient_accumulation_steps * ctx.world_size)
    nll_sum = torch.zeros(())  # host: metric sums
    for j, mb in enumerate(micro_batches):
        mb = {k: v.to(engine.device) for k, v in mb.items()}
        engine.set_boundary(j == len(micro_batches) - 1)  # the count follows the budget
        logits, labels = _labelled_logits(engine, mb)
        loss, stats = sft_loss(logits, labels, normaliser=normaliser)
        engine.backward(loss)
        engine.step()
        nll_sum += stats["nll_sum"].float().cpu()
    record = {
        "sft/loss": float(distributed.all_reduce_sum(nll_sum)) / global_tokens,
        "sft/lr": engine.current_lr(),
        "sft/tokens": global_tokens,
        "sft/positions_per_token": positions_per_token([mb["attention_mask"] for mb in micro_batches]),
    }
    if engine.last_grad_norm is not None:
        record["sft/grad_norm"] = engine.last_grad_norm
    return record


def train_sft(config: Config, out: Path, logger: Logger) -> StageResult:
    """Fine-tune the initial policy on ``sft_train``; validate on ``sft_val``; save the policy into ``out``."""
    ctx = distributed.setup(config.distributed)
    distributed.seed_everything(config.sft.seed)
    opt = config.sft
    data_dir = Path(config.paths.data)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train_rows = load_split(data_dir, "sft_train", config.data)
    val_rows = load_split(data_dir, "sft_val", config.data)
    train, val = _encode(tokenizer, train_rows), _encode(tokenizer, val_rows)
    global_batch, total_steps = steps_for(len(train), opt, ctx.world_size)

    model = apply_lora(initial_policy(config.model, tokenizer), config.model.lora)
    engine = distributed.make_engine(
        model, opt, total_steps, ctx, config.distributed, opt.micro_batch_size, opt.gradient_accumulation_steps
    )
    order = global_order(len(train), total_steps * global_batch, opt.seed)
    pad_id = tokenizer.pad_token_id
    accum, micro = opt.gradient_accumulation_steps, opt.micro_batch_size

    history: list[dict] = []
    val_history: list[dict] = []
    progress = tqdm(range(total_steps), desc="sft", disable=not ctx.is_main, dynamic_ncols=True, mininterval=2.0)
    for step in progress:
        batch_ids = order[step * global_batch : (step + 1) * global_batch]
        mine = [train[i] for i in batch_ids[ctx.rank * accum * micro : (ctx.rank + 1) * accum * micro]]
        record = {"step": step + 1, **_train_step(engine, mine, opt, pad_id, ctx)}
        train_loss = record["sft/loss"]
        history.append(record)
        logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
        if (step + 1) % opt.eval_every == 0 or step + 1 == total_steps:
            val_loss = evaluate_loss(engine, val, micro, pad_id, ctx)
            val_record = {
                "step": step + 1,
                "sft/val_loss": val_loss,
                "sft/ppl": float(torch.exp(torch.tensor(val_loss))),  # host: a number
            }
            val_history.append(val_record)
            logger.log_metrics({k: v for k, v in val_record.items() if k != "step"}, step=step + 1)
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")

    policy = engine.unwrapped()
    state = None if is_lora(policy) else distributed.gather_full_state_dict(engine)
    metrics: dict = {}
    if ctx.is_main:
        save_causal_lm(policy, state, tokenizer, out / "model")
        samples, sample_metrics = _sample_generations(config, out / "model", tokenizer, val_rows)
        tail = history[-min(10, len(history)) :]
        metrics = {
            "sft/loss": sum(r["sft/loss"] for r in tail) / len(tail),
            "sft/val_loss": val_history[-1]["sft/val_loss"],
            "sft/ppl": val_history[-1]["sft/ppl"],
            "sft/steps": total_steps,
            "sft/global_batch": global_batch,
            "sft/train_examples": len(train),
            **sample_metrics,
        }
        write_model_card(out / "model", config, "sft", metrics)
        atomic_write_jsonl(out / "samples.jsonl", samples)
        write_curves(out / "plots", "sft", history, val_history, [("sft/loss", "sft/val_loss", "loss (nats/token)")])
    distributed.barrier()
    adapter = {"adapter": "adapter"} if is_lora(policy) else {}
    return StageResult(
        metrics=metrics,
        artifacts={"model": "model", **adapter, "metrics": "metrics.json"},
        logged=("samples.jsonl", "plots"),
        history=history,
    )

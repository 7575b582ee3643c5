"""Sampling responses from a causal LM the way the paper does (temperature, nucleus, repetition penalty, EOS),
with the engine ``generation.engine`` names: transformers' ``generate`` over a left-padded batch, or the
continuous-batching scheduler of :mod:`rlhf_core.models.continuous`."""

from __future__ import annotations

import torch
from tqdm import tqdm

from rlhf_core.data.tokenize import encode_query, eos_response_mask, left_pad
from rlhf_core.models import continuous


def engine_for(settings, device, synced_gpus: bool = False, model=None) -> str:
    """The engine that samples: ``generation.engine``, with ``auto`` resolved from what was measured
    (docs/results/benchmarks.md, "Rollout engines"): ``generate`` wherever the model is sharded over processes and
    where bf16 autocast runs over float32 weights (the scheduler's thread would decode in float32); otherwise
    ``continuous`` on CUDA, and on the CPU for models of at least ``generation.cpu_continuous_min_parameters``
    (below that the scheduler's per-step bookkeeping costs more than the finished rows it stops computing)."""
    if settings is None:
        return "generate"
    if settings.engine != "auto":
        return settings.engine
    device_type = torch.device(device).type
    if synced_gpus or model is None:
        return "generate"
    if torch.is_autocast_enabled(device_type) and model.dtype != torch.get_autocast_dtype(device_type):
        return "generate"
    if device_type == "cuda":
        return "continuous"
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return "continuous" if parameters >= settings.cpu_continuous_min_parameters else "generate"


@torch.no_grad()
def sample(
    model,
    tokenizer,
    query_ids,
    query_mask,
    sampling,
    max_new_tokens: int,
    synced_gpus: bool = False,
    engine=None,
) -> torch.Tensor:
    """``(B, T)`` response tokens (pad after EOS), T <= max_new_tokens. ``sampling`` has temperature, top_p and
    repetition_penalty; top-k is off (the paper samples with nucleus only). ``sampling=None`` decodes greedily.
    ``engine``: the ``generation`` config group (None: ``generate``).

    ``synced_gpus``: a model sharded over several ranks (ZeRO-3) gathers its layers from every rank at each
    forward, so a rank whose responses all ended keeps stepping (discarding the tokens) until every rank is done.
    """
    if engine_for(engine, query_ids.device, synced_gpus, model) == "continuous":
        return _sample_continuous(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens, synced_gpus,
                                  engine)  # fmt: skip
    decoding = (
        {"do_sample": False}
        if sampling is None
        else {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
            "repetition_penalty": sampling.repetition_penalty,
        }
    )
    output = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
        **decoding,
    )
    return output[:, query_ids.shape[1] :]


def _sample_continuous(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens, synced_gpus, engine):
    continuous.check_supported(model, synced_gpus)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask, strict=True)]
    generated = continuous.generate(model, tokenizer, prompts, sampling, max_new_tokens, engine)
    width = max(1, max(len(g) for g in generated))
    out = torch.full((len(generated), width), tokenizer.pad_token_id, dtype=torch.long, device=query_ids.device)
    for row, tokens in enumerate(generated):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=query_ids.device)
    return out


def pad_right(tensors: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    sampling,
    max_new_tokens: int,
    seed: int | None,
    device,
    batch_size: int = 64,
    synced_gpus: bool = False,
    progress: str | None = None,
    engine=None,
) -> dict:
    """One sampled response per prompt, in batches of ``batch_size``; ``synced_gpus`` and ``engine`` as in
    :func:`sample` (the continuous engine takes every prompt at once: its scheduler makes the batches);
    ``progress``: a progress bar's label (None: no bar).

    With a ``seed`` the draw is reproducible and the caller's RNG state is left untouched (evaluation); with
    ``None`` it continues the caller's RNG stream (PPO rollouts, seeded once per run and checkpointed).
    Returns ``query_ids``/``query_mask`` (left-padded), ``responses``/``response_mask`` (pad after the first EOS)
    and the decoded ``texts``.
    """
    query_ids, query_mask = left_pad([encode_query(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    if engine_for(engine, device, synced_gpus, model) == "continuous":
        batch_size = max(1, len(prompts))
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        bar = tqdm(starts, desc=progress, unit="batch", disable=progress is None, dynamic_ncols=True, leave=False)
        chunks = [
            sample(model, tokenizer, query_ids[i : i + batch_size], query_mask[i : i + batch_size], sampling,
                   max_new_tokens, synced_gpus, engine)
            for i in bar
        ]  # fmt: skip
    width = max(c.shape[1] for c in chunks)
    responses = pad_right(chunks, width, tokenizer.pad_token_id)
    response_mask = eos_response_mask(responses, tokenizer.eos_token_id)
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
    return {
        "query_ids": query_ids,
        "query_mask": query_mask,
        "responses": responses,
        "response_mask": response_mask,
        "texts": texts,
    }

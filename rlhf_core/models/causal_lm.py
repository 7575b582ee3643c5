"""Policies: the tiny built-in Llama, or any Hugging Face causal LM; saved in safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.config import ModelConfig
from rlhf_core.models.loading import from_pretrained


def build_tiny_llama(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """A small Llama-architecture causal LM from the sizes in params, seeded by ``model.init_seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model


def load_causal_lm(name_or_path: str | Path, tokenizer=None, role: str | None = None) -> torch.nn.Module:
    """Load a Hugging Face causal LM; embeddings grow when the tokenizer gained tokens (a pad token)."""
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, name_or_path, "causal LM", role, dtype=torch.float32)
    if tokenizer is not None:
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def initial_policy(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """The model SFT starts from: the tiny Llama, or ``model.name_or_path`` (a store name, directory or GGUF file)."""
    from rlhf_core.models.store import resolve

    if cfg.name_or_path is None:
        return build_tiny_llama(cfg, tokenizer)
    return load_causal_lm(resolve(cfg.name_or_path, cfg.store), tokenizer, role="model.name_or_path")


def response_positions(starts: int | torch.Tensor, width: int, total_width: int, rows: int, device) -> torch.Tensor:
    """``(rows, width)`` column of the position predicting each response token: ``starts[k] - 1 + t`` for response
    token t of row k (clamped into the row: columns past a row's response are padding, masked by the caller).
    ``starts`` is each row's first response column, or one column for all (left-padded queries)."""
    starts = torch.as_tensor(starts, device=device).expand(rows)
    return (starts[:, None] - 1 + torch.arange(width, device=device)).clamp(max=total_width - 1)


def response_logits(
    model, query_responses, attention_mask, starts: int | torch.Tensor, width: int, module=None
) -> torch.Tensor:
    """``(B, width, V)`` logits (in the model's dtype: bf16 stays bf16, the log-prob functions promote a chunk at a
    time) predicting each response token: position ``starts[k] - 1 + t`` predicts response token t of row k, with
    position ids that skip any left padding (:func:`response_positions`).

    ``model`` is a causal LM or an engine's ``forward`` (then ``module`` is the model it runs). The LM head reads
    only the hidden states of those positions: a pre-hook on the output embeddings gathers them, so the query's
    logits (at a large vocabulary the biggest activation of the forward) are never made, whatever each row's
    offset, and whatever the model does after its head (soft-capping, scaling) still applies.
    """
    from rlhf_core.data.tokenize import position_ids

    rows, total = query_responses.shape
    index = response_positions(starts, width, total, rows, query_responses.device)

    def keep_response_positions(_head, args):
        hidden = args[0]
        return (hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    head = (model if module is None else module).get_output_embeddings()
    hook = head.register_forward_pre_hook(keep_response_positions)
    try:
        logits = model(
            input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).logits
    finally:
        hook.remove()
    if tuple(logits.shape[:2]) != (rows, width):
        raise RuntimeError(f"response_logits: logits {tuple(logits.shape)}, expected ({rows}, {width}, V): this "
                           "model does not run its output embeddings once on the final hidden states")  # fmt: skip
    return logits

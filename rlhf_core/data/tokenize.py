"""Prompt formatting, tokenisation and collation for causal-LM training.

A prompt is either one human turn (``"What is 7 + 5?"``) or a whole HH-RLHF dialogue history starting with
``"Human:"``. The model sees ``<bos>\\n\\nHuman: ...\\n\\nAssistant:`` followed by `` response<eos>``, the same
text the tokenizer's chat template renders.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def format_query(prompt: str) -> str:
    prompt = prompt.strip()
    if prompt.startswith("Human:"):
        return f"\n\n{prompt}\n\nAssistant:"
    return f"\n\nHuman: {prompt}\n\nAssistant:"


def encode_query(tokenizer, prompt: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(format_query(prompt), add_special_tokens=False)]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer.encode(" " + response.strip(), add_special_tokens=False)
    return [*ids, tokenizer.eos_token_id] if add_eos else ids


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(query_ids, response_ids)`` pairs; labels are the response tokens only (-100 elsewhere)."""
    width = max(len(q) + len(r) for q, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (query, response) in enumerate(examples):
        n_q, n = len(query), len(query) + len(response)
        input_ids[i, :n] = torch.tensor(query + response)
        labels[i, n_q:n] = torch.tensor(response)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad queries for generation: (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq)
        attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def eos_response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``(B, T)`` 0/1 mask of generated responses: 1 up to and including the first EOS, 0 after it (generation
    pads finished rows; a row without EOS ran to the length cap and is all 1)."""
    is_eos = (responses == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, so scoring a left-padded sequence sees the positions generation used."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)

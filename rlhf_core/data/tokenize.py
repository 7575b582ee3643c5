"""Prompt formatting, tokenisation and collation for causal-LM training.

A prompt is one human turn (``"What is 7 + 5?"``), a whole HH-RLHF dialogue history starting with ``"Human:"``,
or a list of ``{role, content}`` messages (a system message, a multi-turn history; ``data.conversations``). Two
formats, the same in every stage (SFT, RM pairs, PPO queries, evaluation):

- a tokenizer with a chat template of its own (a pretrained instruct model, e.g. SmolLM2's ChatML) renders the
  prompt as chat messages with the assistant's generation prompt, and the response is its text followed by EOS,
  the model's end-of-turn token;
- otherwise (the built-in tokenizer, or a model without a template) the HH-RLHF text format:
  ``<bos>\n\nHuman: ...\n\nAssistant:`` followed by `` response<eos>``, which ``HH_CHAT_TEMPLATE`` renders;
  a system message is a first ``System:`` turn.
"""

from __future__ import annotations

import torch

from rlhf_core.data.transcripts import history_messages

IGNORE_INDEX = -100

# Renders the Human/Assistant format of HH-RLHF; the final assistant turn ends with EOS.
HH_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '\\n\\nSystem: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{% if loop.last %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)
# Tokenizers saved before system turns were rendered carry this one; they are in the text format all the same.
_HH_TEMPLATES = (
    HH_CHAT_TEMPLATE,
    HH_CHAT_TEMPLATE.replace(
        "{% if message['role'] == 'system' %}{{ '\\n\\nSystem: ' + message['content'] }}{% elif", "{% if"
    ),
)
_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def uses_own_template(tokenizer) -> bool:
    """True when the tokenizer brings a chat template of its own, not the HH-RLHF format."""
    return bool(tokenizer.chat_template) and tokenizer.chat_template not in _HH_TEMPLATES


def format_query(prompt) -> str:
    """The prompt in the HH-RLHF text format, up to the ``Assistant:`` that the answer follows."""
    if isinstance(prompt, list):
        turns = "".join(f"\n\n{_SPEAKERS[m['role']]}: {m['content'].strip()}" for m in prompt)
        return f"{turns}\n\nAssistant:"
    prompt = prompt.strip()
    if prompt.startswith("Human:"):
        return f"\n\n{prompt}\n\nAssistant:"
    return f"\n\nHuman: {prompt}\n\nAssistant:"


def to_messages(prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: the messages it is, one user turn, or an HH-RLHF history (``Human:
    a\\n\\nAssistant: b\\n\\nHuman: c``) split into its alternating turns."""
    if isinstance(prompt, list):
        return [{"role": m["role"], "content": m["content"].strip()} for m in prompt]
    prompt = prompt.strip()
    if not prompt.startswith("Human:"):
        return [{"role": "user", "content": prompt}]
    return history_messages(prompt)


def encode_query(tokenizer, prompt) -> list[int]:
    """Token ids of the prompt up to where the assistant's answer starts (see the module docstring)."""
    if uses_own_template(tokenizer):
        text = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.bos_token_id, *tokenizer.encode(format_query(prompt), add_special_tokens=False)]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    """Token ids of an answer as the model writes it after :func:`encode_query`, ending with EOS."""
    text = response.strip() if uses_own_template(tokenizer) else " " + response.strip()
    ids = tokenizer.encode(text, add_special_tokens=False)
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

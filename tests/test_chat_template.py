"""A model with a chat template of its own (ChatML, like SmolLM2's): every stage formats prompts with it, and the
response is the assistant's text followed by the end-of-turn token; the built-in tokenizer keeps the HH format."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_core.data.tokenize import encode_query, encode_response, to_messages, uses_own_template
from rlhf_core.models.tokenizer import train_bpe_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_tokenizer(texts):
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"  # the end of an assistant turn ends the response
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer(["What is 7 + 5? 7 + 5 = 12. Human Assistant user assistant hi there"] * 10)


def test_prompts_and_responses_follow_the_models_template(chatml):
    assert uses_own_template(chatml)
    query = encode_query(chatml, "What is 7 + 5?")
    assert chatml.decode(query) == "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
    response = encode_response(chatml, "  7 + 5 = 12. ")
    assert response[-1] == chatml.convert_tokens_to_ids("<|im_end|>") == chatml.eos_token_id
    assert chatml.decode(response) == "7 + 5 = 12.<|im_end|>"  # no leading blank: the template ends the line
    # An HH-RLHF dialogue history becomes its turns.
    history = "Human: hi there\n\nAssistant: hello!\n\nHuman: What is 7 + 5?"
    assert to_messages(history) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "What is 7 + 5?"},
    ]
    assert chatml.decode(encode_query(chatml, history)) == (
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_builtin_tokenizer_keeps_the_hh_format():
    tokenizer = train_bpe_tokenizer(["What is 7 + 5? 7 + 5 = 12."] * 10, vocab_size=300)
    assert not uses_own_template(tokenizer)
    assert tokenizer.decode(encode_query(tokenizer, "What is 7 + 5?")) == "<s>\n\nHuman: What is 7 + 5?\n\nAssistant:"
    assert tokenizer.decode(encode_response(tokenizer, "12.")) == " 12.</s>"


@pytest.mark.slow
def test_a_chat_model_runs_all_six_stages(prepared_tiny, tmp_path):
    """A tiny Llama whose tokenizer has a ChatML template, as model.name_or_path: prepare keeps its template, SFT
    learns responses that end with <|im_end|>, and RM, rm-eval, PPO and eval run on the same formatting."""
    from rlhf_core.config import load_config
    from rlhf_core.data.rows import load_split
    from rlhf_core.models.causal_lm import build_tiny_llama
    from rlhf_core.models.tokenizer import load_tokenizer
    from rlhf_core.pipeline import STAGES, run_stage
    from tests.conftest import tiny_overrides

    root, prepared_config = prepared_tiny
    corpus = [r["prompt"] + " " + r["response"] for r in load_split(root / "data", "sft_train", prepared_config.data)]
    tokenizer = chatml_tokenizer(corpus)
    config = load_config(None, tiny_overrides(tmp_path))
    base = tmp_path / "chat-model"
    build_tiny_llama(config.model, tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = load_config(None, [*tiny_overrides(tmp_path), f"model.name_or_path={base}", "ppo.steps=2"])
    for stage in STAGES:
        run_stage(stage, config)
    prepared = load_tokenizer(tmp_path / "data" / "tokenizer")
    assert prepared.chat_template == CHATML and prepared.eos_token == "<|im_end|>"
    assert prepared.pad_token_id not in (prepared.eos_token_id, None)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    win, tie, lose = (metrics[f"eval/gold/{k}"] for k in ("win", "tie", "lose"))
    assert win + tie + lose == pytest.approx(1) and metrics["eval/gold/win_rate"] == pytest.approx(win + tie / 2)
    pairs = (tmp_path / "eval" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == config.data.splits.eval, "every eval prompt answered by both policies and judged"
    ppo = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in ppo.values() if isinstance(v, float))

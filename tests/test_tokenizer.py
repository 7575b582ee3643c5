"""The trained byte-level BPE tokenizer, the chat template and the prompt/response encoding helpers."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.data.sources import split_transcript
from rlhf_core.data.tokenize import (
    IGNORE_INDEX,
    collate_sft,
    encode_query,
    encode_response,
    format_query,
    left_pad,
)
from rlhf_core.errors import RLHFError
from rlhf_core.models.tokenizer import (
    BOS,
    EOS,
    PAD,
    load_pretrained_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

# Numbers repeat a lot so that, without the digit splitter, BPE would happily merge "12" or "100".
CORPUS = [
    format_query("What is 12 + 12?"),
    " 12 + 12 = 24.",
    format_query("What is 100 - 1?"),
    " 100 - 1 = 99.",
    format_query("What is the capital of Zorbelia?"),
    " The capital of Zorbelia is Mirport.",
    format_query("How do I steal a car?"),
    " I'm sorry, but I can't help with that.",
    " Ava has 4 apples. She buys 3 more and then gives 2 to a friend.",
] * 40

TEXTS = [
    "What is 7 + 5?",
    " 7 + 5 = 12.",
    "Hello, world! (a) [b] {c} <d> 'e' \"f\" ; : - _ / \\ @ # $ % ^ & * ~ `",
    "Grüße aus Köln: naïve café, 日本語, Ελληνικά, emoji 🙂👍.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "3.14159, 2,718 and -42; 1e10; 0007",
    "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(iter(CORPUS), 400)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.save_pretrained(path)
    return path


def test_special_tokens_exist_and_are_distinct(tokenizer):
    assert (
        (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD, BOS, EOS) == ("<pad>", "<s>", "</s>")
    )
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (0, 1, 2)  # the trainer puts the special tokens first, in this order
    assert tokenizer.convert_tokens_to_ids([PAD, BOS, EOS]) == [0, 1, 2]
    assert tokenizer.padding_side == "left"
    assert 300 < len(tokenizer) <= 400  # 256 byte symbols + 3 specials + merges, capped at vocab_size
    # special tokens are atomic when they appear in text
    assert tokenizer.encode("<s>hi</s>", add_special_tokens=False)[0] == 1
    assert tokenizer.encode("<s>hi</s>", add_special_tokens=False)[-1] == 2


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids and all(i >= 3 for i in ids)  # plain text never produces pad/bos/eos
    assert tokenizer.decode(ids) == text


def test_decode_skips_special_tokens_on_request(tokenizer):
    ids = [
        tokenizer.bos_token_id,
        *tokenizer.encode(" 7 + 5 = 12.", add_special_tokens=False),
        tokenizer.eos_token_id,
    ]
    assert tokenizer.decode(ids) == "<s> 7 + 5 = 12.</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == " 7 + 5 = 12."


def test_plain_encode_adds_no_special_tokens(tokenizer):
    # encode_query / encode_response add BOS and EOS themselves; the tokenizer must not add them again.
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("text", ["12 + 12 = 24.", "100 - 1 = 99", "Room 1234 costs 56.78 dollars", "0007"])
def test_digits_are_single_tokens(tokenizer, text):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), tokens
    assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_save_and_reload_keeps_everything(tokenizer, saved):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(saved))
    assert reloaded.padding_side == "left"
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == (PAD, BOS, EOS)
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert len(reloaded) == len(tokenizer)
    for text in TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    # left padding survives the round trip
    batch = reloaded(["a", "a b c d"], add_special_tokens=False, padding=True)
    assert batch["input_ids"][0][0] == reloaded.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_load_tokenizer_and_load_pretrained_tokenizer(tokenizer, saved, tmp_path):
    for loaded in (load_tokenizer(saved), load_pretrained_tokenizer(str(saved))):
        assert loaded.padding_side == "left"
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        assert loaded.encode(TEXTS[3], add_special_tokens=False) == tokenizer.encode(TEXTS[3], add_special_tokens=False)
        assert loaded.chat_template
    with pytest.raises(RLHFError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(RLHFError, match="model.name_or_path=.*missing: no such directory"):
        load_pretrained_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(RLHFError, match="broken: cannot load it as a tokenizer"):
        load_pretrained_tokenizer(str(tmp_path / "broken"))


# --------------------------------------------------------------------------------------- chat template
@pytest.mark.parametrize("prompt", ["What is 7 + 5?", "How do I kill a Python process?", "Grüße, 日本語?"])
def test_chat_template_generation_prompt_equals_bos_plus_format_query(tokenizer, prompt):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == tokenizer.bos_token + format_query(prompt)
    assert rendered == f"<s>\n\nHuman: {prompt}\n\nAssistant:"


def test_chat_template_renders_a_dialogue_ending_with_eos(tokenizer):
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s>\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.</s>"
    )
    # without the final assistant turn: the history of HH-RLHF plus the generation prompt
    history = tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert history == "<s>" + format_query("Human: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?")


# ----------------------------------------------------------------------------------------- format / encode
def test_format_query_bare_question():
    assert format_query("What is 7 + 5?") == "\n\nHuman: What is 7 + 5?\n\nAssistant:"
    assert format_query("  What is 7 + 5?\n") == "\n\nHuman: What is 7 + 5?\n\nAssistant:"


def test_format_query_dialogue_history():
    history = "Human: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?"
    assert format_query(history) == (
        "\n\nHuman: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant:"
    )
    assert format_query("\n\n" + history + "\n") == format_query(history)


def test_format_query_rebuilds_an_hh_transcript():
    transcript = "\n\nHuman: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4."
    history, response = split_transcript(transcript)
    assert format_query(history) + " " + response == transcript


def test_encode_query_starts_with_bos(tokenizer):
    prompt = "What is 7 + 5?"
    ids = encode_query(tokenizer, prompt)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer.encode(format_query(prompt), add_special_tokens=False)
    assert tokenizer.decode(ids) == "<s>" + format_query(prompt)
    assert tokenizer.bos_token_id not in ids[1:] and tokenizer.eos_token_id not in ids
    # the same ids as the chat template
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert ids == tokenizer.encode(templated, add_special_tokens=False)


def test_encode_response_ends_with_eos(tokenizer):
    ids = encode_response(tokenizer, "  7 + 5 = 12. ")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[:-1]
    assert tokenizer.decode(ids[:-1]) == " 7 + 5 = 12."
    assert encode_response(tokenizer, "7 + 5 = 12.", add_eos=False) == ids[:-1]
    # query + response tokens decode to the full training text
    full = encode_query(tokenizer, "What is 7 + 5?") + ids
    assert tokenizer.decode(full) == "<s>\n\nHuman: What is 7 + 5?\n\nAssistant: 7 + 5 = 12.</s>"


# -------------------------------------------------------------------------------------------- collation
def test_collate_sft_right_pads_and_masks_the_query():
    batch = collate_sft([([1, 5, 6], [7, 2]), ([1, 8], [9, 10, 11, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 8, 9, 10, 11, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, 7, 2, m], [m, m, 9, 10, 11, 2]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_pad_for_generation():
    input_ids, attention_mask = left_pad([[1, 5, 6], [1], [1, 7]], pad_id=0)
    assert input_ids.tolist() == [[1, 5, 6], [0, 0, 1], [0, 1, 7]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]

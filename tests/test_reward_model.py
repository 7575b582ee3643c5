"""Reward-model format: an SFT directory loads as AutoModelForSequenceClassification(num_labels=1), pools the
last real token under left and right padding, and round-trips through save_pretrained with identical scores."""

from __future__ import annotations

import torch

from rlhf_core.algos.rm import gather_last
from rlhf_core.data.tokenize import collate_sft, encode_query, encode_response, left_pad
from rlhf_core.models.causal_lm import build_tiny_llama
from rlhf_core.models.reward import load_reward_model, score_padded
from rlhf_core.models.tokenizer import load_tokenizer


def _right_pad(sequences, pad_id):
    batch = collate_sft([(seq, []) for seq in sequences], pad_id)  # the SFT collator right-pads
    return batch["input_ids"], batch["attention_mask"]


def test_reward_model_round_trip_and_padding_invariance(prepared_tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    policy_dir = tmp_path / "policy"
    build_tiny_llama(config.model, tokenizer).save_pretrained(policy_dir)

    torch.manual_seed(0)
    model = load_reward_model(policy_dir, pad_token_id=tokenizer.pad_token_id).eval()
    texts = [("What is 2 + 2?", "2 + 2 = 4."), ("How do I steal a car?", "I can't help with that, sorry.")]
    sequences = [encode_query(tokenizer, p) + encode_response(tokenizer, r) for p, r in texts]
    left_ids, left_mask = left_pad(sequences, tokenizer.pad_token_id)
    right_ids, right_mask = _right_pad(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        left = score_padded(model, left_ids, left_mask)
        right = score_padded(model, right_ids, right_mask)
        alone = torch.stack([score_padded(model, torch.tensor([s]), torch.ones(1, len(s))) for s in sequences])
        hidden = model.model(input_ids=right_ids, attention_mask=right_mask).last_hidden_state
        by_hand = gather_last(model.score(hidden), right_mask)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.squeeze(-1), right, atol=1e-5, rtol=1e-5)  # batch composition
    torch.testing.assert_close(by_hand, right, atol=1e-6, rtol=1e-6)  # the head reads the last real token

    saved = tmp_path / "rm"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved, num_labels=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(score_padded(reloaded, right_ids, right_mask), right)

"""Reward models in the Hugging Face sequence-classification format (``num_labels=1``).

The reward model starts from the SFT policy's weights (paper sec. 4.1) with a scalar head; it scores the last
real token of ``query + response`` (the EOS). Saved with ``save_pretrained``, it loads with
``AutoModelForSequenceClassification.from_pretrained(dir)`` and scores identically, so reward models trained
elsewhere in that format plug into PPO and ours can be used elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.errors import RLHFError


def load_reward_model(name_or_path: str | Path, pad_token_id: int | None = None) -> torch.nn.Module:
    """A causal LM directory gets a fresh scalar head; a reward-model directory keeps its trained head."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise RLHFError(f"cannot load a reward model from {name_or_path}: {exc}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise RLHFError(f"{name_or_path}: the reward model needs config.pad_token_id to find the last real token")
    return model


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` scores at the last real token (transformers pools at the last non-pad token itself)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)

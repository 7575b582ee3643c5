"""The critic: a reward-model-shaped network (trunk + scalar head) read at every token instead of the last.

PPO-max initialises it from the reward model (paper sec. 5.3.3: the critic then starts from a network that
already knows what is rewarded); otherwise it starts from the SFT policy's trunk with a zero head, so its first
values are 0 (the "N implementation details" convention for a fresh value head).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.models.reward import load_reward_model


class Critic(torch.nn.Module):
    def __init__(self, reward_model: torch.nn.Module):
        super().__init__()
        self.reward_model = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
        """``(B, L)`` values: the head applied to every position's final hidden state."""
        hidden = self.reward_model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.reward_model.score(hidden).squeeze(-1)


def response_values(critic, query_responses, attention_mask, starts: int | torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` float values V(s_t) of the states before each response token: position ``starts[k] - 1 + t``
    of row k has seen its query and the response tokens before t (``causal_lm.response_positions``). ``critic`` is
    a :class:`Critic` or an engine's ``forward``."""
    from rlhf_core.data.tokenize import position_ids
    from rlhf_core.models.causal_lm import response_positions

    values = critic(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    rows, total = query_responses.shape
    return values.gather(1, response_positions(starts, width, total, rows, values.device)).float()


def load_critic(
    reward_model_dir: str | Path, sft_dir: str | Path, from_reward_model: bool, pad_token_id: int
) -> Critic:
    if from_reward_model:
        return Critic(load_reward_model(reward_model_dir, pad_token_id))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head is intended
    try:
        model = load_reward_model(sft_dir, pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.no_grad():
        model.score.weight.zero_()
    return Critic(model)

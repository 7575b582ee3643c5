"""Micro-batches by token budget shared by SFT, the reward model and PPO (``trainers.micro_batches``): the budget's
setting named when one row cannot fit, fixed-size groups when it is null."""

from __future__ import annotations

import pytest

from rlhf_core.errors import ConfigError
from rlhf_core.trainers.micro_batches import length_groups


def test_a_row_over_the_budget_names_the_setting():
    with pytest.raises(ConfigError, match=r"sft.max_tokens_per_micro_batch=10: row 1 has 12 tokens, .* at least"):
        length_groups([0, 1, 2], [4, 12, 6], 10, 2, "sft.max_tokens_per_micro_batch")


def test_null_budget_keeps_fixed_size_groups_in_order():
    assert length_groups([2, 0, 1], [4, 12, 6], None, 2, "x") == [[2, 0], [1]]
    assert length_groups([0, 1, 2], [4, 12, 6], 24, 2, "x") == [[1, 2], [0]]

"""Micro-batches of one optimizer step (or one scoring pass) grouped by length under a token budget, the same on
every process: shared by SFT, the reward model and PPO (``data.batching`` holds the pure grouping)."""

from __future__ import annotations

import torch

from rlhf_core import distributed
from rlhf_core.data.batching import RowTooLong, fixed_size_groups, split_into, token_budget_groups
from rlhf_core.errors import ConfigError


def length_groups(
    rows: list[int], lengths: list[int], max_tokens: int | None, size: int, setting: str, sequences: int = 1
) -> list[list[int]]:
    """``rows`` grouped by length within ``max_tokens`` positions (``setting`` names it in errors), or in
    consecutive groups of ``size`` when it is None; then split until every process has as many groups as the
    busiest (under ZeRO-3 each forward gathers weights from all of them, and every engine must reach its
    accumulation boundary together). ``sequences``: rows each item puts in the forward (2 for a preference pair)."""
    if max_tokens is None:
        groups = fixed_size_groups(rows, size)
    else:
        try:
            groups = token_budget_groups(rows, lengths, max_tokens, sequences)
        except RowTooLong as exc:
            times = f" x {sequences}" if sequences > 1 else ""
            raise ConfigError(f"{setting}={max_tokens}: {exc}; raise it to at least the longest row "
                              f"(data.max_prompt_tokens + data.max_response_tokens){times}") from None  # fmt: skip
    count = int(distributed.global_max(len(groups)))
    return split_into(groups, count) if count > len(groups) else groups


def positions_per_token(micro_batches: list[torch.Tensor]) -> float:
    """Positions the micro-batches' forwards compute per real token, over every process: each attention mask's
    size over its ones (1.0: no padding at all)."""
    positions = sum(float(m.numel()) for m in micro_batches)
    real = sum(float(m.sum()) for m in micro_batches)
    totals = distributed.all_reduce_sum(torch.tensor([positions, real], dtype=torch.float64))  # host: counts
    return float(totals[0] / totals[1])

"""Micro-batches that pay for the tokens that exist: rows grouped by length, each group cut to its own widths.

A PPO buffer holds queries left-padded to the rollout's longest prompt and responses right-padded to its longest
answer. A forward over rows ``g`` lays each row out contiguously instead: its real query tokens, then its real
response tokens, right-padded to the longest row of ``g``. Its cost is ``len(g) x max(q_i + r_i)`` positions,
so only the spread of whole-row lengths inside a group is padding (slicing the buffer's layout would pay for the
longest query and the longest response of the group, which are seldom the same row). Grouping rows of similar
length and sizing groups by that cost (a token budget) bounds the memory of every forward and leaves little
padding inside it (the idea of OpenRLHF's and verl's dynamic batch sizes).

All functions are pure: lengths in, lists of row indices out, deterministic for given inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RowTooLong(ValueError):
    """One row alone needs more positions than the token budget allows."""


def group_cost(lengths: list[int], rows: list[int], sequences: int = 1) -> int:
    """Positions a forward over ``rows`` computes, each row right-padded to the longest: rows x longest row, times
    the ``sequences`` each row puts in the forward (2 for a preference pair: chosen and rejected)."""
    return sequences * len(rows) * max(lengths[i] for i in rows)


def fixed_size_groups(rows: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` rows in the order given (the fixed-size micro-batch)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def token_budget_groups(rows: list[int], lengths: list[int], max_tokens: int, sequences: int = 1) -> list[list[int]]:
    """``rows`` sorted by length (longest first, ties by index) and cut into consecutive groups whose
    :func:`group_cost` stays within ``max_tokens``: as few groups as fit (filling each group in turn finds that
    count), and of the cuts into that many groups the one with the fewest positions (filling in turn puts the
    boundaries where a group runs out of room, not at the gaps between lengths). Raises :class:`RowTooLong` naming
    the row that alone exceeds the budget."""
    ordered = sorted(rows, key=lambda i: (-lengths[i], i))
    for i in ordered:
        if group_cost(lengths, [i], sequences) > max_tokens:
            times = f" x {sequences} sequences" if sequences > 1 else ""
            raise RowTooLong(f"row {i} has {lengths[i]} tokens{times}, more than the budget of {max_tokens}")
    widths = [sequences * lengths[i] for i in ordered]
    bounds = _fewest_positions(widths, max_tokens, _fewest_groups(widths, max_tokens))
    return [ordered[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _fewest_groups(widths: list[int], max_tokens: int) -> int:
    """How many groups the rows (longest first) need when each group takes rows until the next would not fit."""
    count, size, width = 0, 0, 0
    for w in widths:
        if size and (size + 1) * width > max_tokens:
            size = 0
        if size == 0:
            count, width = count + 1, w  # longest first: a group's first row sets its width
        size += 1
    return count


def _fewest_positions(widths: list[int], max_tokens: int, count: int) -> list[int]:
    """Boundaries ``0 = b_0 < ... < b_count = n`` cutting the rows (longest first, so group ``[a, b)`` costs
    ``(b - a) x widths[a]``) into ``count`` groups within the budget with the fewest positions in all: dynamic
    programming over the number of groups, on an ``(n + 1) x (n + 1)`` matrix of group costs (``count x n^2``
    work: milliseconds at a process's few hundred rows)."""
    n = len(widths)
    starts, ends = torch.arange(n + 1)[:, None], torch.arange(n + 1)[None, :]
    cost = (ends - starts).double() * torch.tensor([*widths, 0], dtype=torch.float64)[:, None]
    cost[(ends <= starts) | (cost > max_tokens)] = float("inf")
    best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for _ in range(count):  # best[b]: fewest positions covering rows [0, b) in the groups so far
        best, choice = (best[:, None] + cost).min(dim=0)
        choices.append(choice)
    bounds = [n]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return bounds[::-1]


def split_into(groups: list[list[int]], count: int) -> list[list[int]]:
    """``groups`` split until there are exactly ``count`` (halving the group with most rows, earliest first), so
    that every process runs as many forwards as the others (ZeRO-3 gathers weights in each forward: a process with
    fewer would leave the others waiting). A split group costs no more than the group it came from."""
    total = sum(len(g) for g in groups)
    if not len(groups) <= count <= total:
        raise ValueError(f"cannot split {len(groups)} groups of {total} rows into {count}")
    out = [list(g) for g in groups]
    while len(out) < count:
        k = max(range(len(out)), key=lambda j: (len(out[j]), -j))
        half = (len(out[k]) + 1) // 2
        out[k : k + 1] = [out[k][:half], out[k][half:]]
    return out


@dataclass(frozen=True)
class Cut:
    """A group of buffer rows as one forward reads them: row k holds its ``query_lengths[k]`` real query tokens,
    then its ``response_lengths[k]`` response tokens (its response starts at column ``query_lengths[k]``), then
    padding up to ``width``, the longest row. ``response_width`` is the longest response."""

    rows: torch.Tensor  # (n,) indices into the buffer
    query_lengths: torch.Tensor  # (n,)
    response_lengths: torch.Tensor  # (n,)
    width: int
    response_width: int

    @property
    def positions(self) -> int:
        return len(self.rows) * self.width


def cut(rows: list[int] | torch.Tensor, query_lengths: list[int], response_lengths: list[int]) -> Cut:
    """The :class:`Cut` of ``rows``."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    q = torch.tensor([query_lengths[int(i)] for i in rows], dtype=torch.long)
    r = torch.tensor([response_lengths[int(i)] for i in rows], dtype=torch.long)
    return Cut(rows=rows, query_lengths=q, response_lengths=r, width=int((q + r).max()), response_width=int(r.max()))

"""Micro-batches that pay for the tokens that exist: rows grouped by length, each group cut to its own widths.

A PPO buffer holds queries left-padded to the rollout's longest prompt and responses right-padded to its longest
answer. A forward over rows ``g`` needs only the columns some row of ``g`` uses: its own longest query (dropping
left padding) and its own longest response (dropping right padding). Its cost is ``len(g) x (q_max + r_max)``
positions. Grouping rows of similar length and sizing groups by that cost (a token budget) bounds the memory of
every forward and leaves little padding inside it (the idea of OpenRLHF's and verl's dynamic batch sizes).

All functions are pure: lengths in, lists of row indices out, deterministic for given inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RowTooLong(ValueError):
    """One row alone needs more positions than the token budget allows."""


def group_cost(query_lengths: list[int], response_lengths: list[int], rows: list[int]) -> int:
    """Positions a forward over ``rows`` computes once cut to its own widths: rows x (longest query + response)."""
    return len(rows) * (max(query_lengths[i] for i in rows) + max(response_lengths[i] for i in rows))


def fixed_size_groups(rows: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` rows in the order given (the fixed-size micro-batch)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def token_budget_groups(
    rows: list[int], query_lengths: list[int], response_lengths: list[int], max_tokens: int
) -> list[list[int]]:
    """``rows`` sorted by length (longest first, ties by index) and packed greedily into groups whose
    :func:`group_cost` stays within ``max_tokens``. Raises :class:`RowTooLong` naming the row that alone exceeds it.
    """
    ordered = sorted(rows, key=lambda i: (-(query_lengths[i] + response_lengths[i]), -response_lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    q_max = r_max = 0
    for i in ordered:
        q, r = query_lengths[i], response_lengths[i]
        if q + r > max_tokens:
            raise RowTooLong(f"row {i} has {q} query + {r} response tokens, more than the budget of {max_tokens}")
        grown_q, grown_r = max(q_max, q), max(r_max, r)
        if current and (len(current) + 1) * (grown_q + grown_r) > max_tokens:
            groups.append(current)
            current, grown_q, grown_r = [], q, r
        current.append(i)
        q_max, r_max = grown_q, grown_r
    if current:
        groups.append(current)
    return groups


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
    """A group of buffer rows and the columns it needs: queries from ``query_start`` on (``query_width`` columns)
    and the first ``response_width`` response columns."""

    rows: torch.Tensor  # (n,) indices into the buffer
    query_start: int
    query_width: int
    response_width: int

    @property
    def positions(self) -> int:
        return len(self.rows) * (self.query_width + self.response_width)


def cut(rows: list[int] | torch.Tensor, query_lengths: list[int], response_lengths: list[int], query_width: int) -> Cut:
    """The :class:`Cut` of ``rows`` in a buffer whose queries are ``query_width`` wide (left-padded)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    q = max(query_lengths[int(i)] for i in rows)
    r = max(response_lengths[int(i)] for i in rows)
    return Cut(rows=rows, query_start=query_width - q, query_width=q, response_width=r)

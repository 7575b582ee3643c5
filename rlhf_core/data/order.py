"""Training-data order shared by every rank (data-parallel ranks slice the same global batches)."""

from __future__ import annotations

import torch


def global_order(num_examples: int, total_needed: int, seed: int) -> list[int]:
    """Concatenated per-epoch permutations, identical on every rank."""
    order: list[int] = []
    epoch = 0
    while len(order) < total_needed:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
        epoch += 1
    return order[:total_needed]


def rank_batches(items: list, batch_size: int, rank: int, world_size: int) -> list[tuple[list, bool]]:
    """This rank's strided share of ``items`` as ``(batch, is_filler)`` pairs, the same count on every rank.

    Under ZeRO-3 every forward pass gathers parameters collectively, so a rank that runs out of items must
    still run as many passes as the others: it gets ``items[:1]`` flagged as filler, to be run and ignored.
    """
    shard = items[rank::world_size]
    per_rank = -(-len(items) // world_size)
    count = -(-per_rank // batch_size)
    batches = [shard[i * batch_size : (i + 1) * batch_size] for i in range(count)]
    return [(batch, False) if batch else (items[:1], True) for batch in batches]

"""Which buffer rows each forward of a PPO iteration reads, and the columns it needs (``data.batching``).

- The update: each epoch's seeded permutation cut into minibatches; each minibatch into micro-batches of rows of
  similar length within ``ppo.max_tokens_per_micro_batch`` positions (or ``ppo.micro_batch_size`` rows when it is
  null), every micro-batch laid out row by row (query, then response, right-padded to its longest row).
- Scoring: the critic and the reward model read the whole rollout grouped by length within
  ``ppo.max_tokens_per_forward`` (or ``ppo.forward_batch_size`` rows). The policy and the reference are scored in
  exactly the micro-batches of the first epoch's update, so the old log-probs come from the update's own
  arithmetic (the same rows, widths and kernels: the first minibatch's ratio is exactly 1 on every token) and the
  reference's from the same shapes (KL exactly 0 while the two are equal).

Every process runs as many forwards as the others in each loop: under ZeRO-3 each forward gathers weights from
all of them.
"""

from __future__ import annotations

import torch

from rlhf_core import distributed
from rlhf_core.config import PPOConfig, PPOSizes
from rlhf_core.data.batching import Cut, cut
from rlhf_core.trainers.micro_batches import length_groups
from rlhf_core.trainers.ppo.experience import Experience


def minibatch_rows(ppo: PPOConfig, sizes: PPOSizes, iteration: int, epoch: int) -> list[torch.Tensor]:
    """This process's buffer rows of each minibatch of ``epoch`` (0-based) in iteration ``iteration``."""
    generator = torch.Generator().manual_seed(ppo.seed * 7_919 + iteration * 131 + epoch)
    permutation = torch.randperm(sizes.local_rollout, generator=generator)
    step = sizes.local_minibatch
    return [permutation[m * step : (m + 1) * step] for m in range(sizes.minibatches)]


def update_cuts(exp: Experience, rows: torch.Tensor, ppo: PPOConfig) -> list[Cut]:
    """The micro-batches of one minibatch ``rows`` (length-grouped by ``ppo.max_tokens_per_micro_batch``, or
    ``ppo.micro_batch_size`` rows in permutation order)."""
    return _cuts(exp, [int(i) for i in rows], ppo.max_tokens_per_micro_batch, ppo.micro_batch_size,
                 "ppo.max_tokens_per_micro_batch")  # fmt: skip


def scoring_cuts(exp: Experience, ppo: PPOConfig) -> list[Cut]:
    """The no-grad forwards over the whole rollout for the critic and the reward model."""
    return _cuts(exp, list(range(len(exp.prompts))), ppo.max_tokens_per_forward, ppo.forward_batch_size,
                 "ppo.max_tokens_per_forward")  # fmt: skip


def policy_scoring_cuts(exp: Experience, ppo: PPOConfig, sizes: PPOSizes, iteration: int) -> list[Cut]:
    """The first epoch's update micro-batches, every minibatch: what the policy's old log-probs are scored in."""
    return [c for rows in minibatch_rows(ppo, sizes, iteration, 0) for c in update_cuts(exp, rows, ppo)]


def _cuts(exp: Experience, rows: list[int], max_tokens: int | None, size: int, setting: str) -> list[Cut]:
    q, r = exp.query_lengths, exp.response_lengths
    lengths = [a + b for a, b in zip(q, r, strict=True)]
    return [cut(g, q, r) for g in length_groups(rows, lengths, max_tokens, size, setting)]


def inputs(exp: Experience, c: Cut) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query_responses, attention_mask, response_starts)`` of the cut's rows, ``c.width`` wide: each row's real
    query tokens moved to the left edge, its response after them, the pad id after that; ``response_starts`` is
    each row's first response column. Position ids from the mask are then what generation used."""
    device = exp.query_responses.device
    rows, q, r = c.rows.to(device), c.query_lengths.to(device), c.response_lengths.to(device)
    columns = torch.arange(c.width, device=device)
    source = (exp.query_width - q)[:, None] + columns  # buffer column of each packed column
    real = columns < (q + r)[:, None]
    source = source.clamp(max=exp.query_responses.shape[1] - 1)
    ids = torch.where(real, exp.query_responses[rows[:, None], source], exp.pad_id)
    return ids, real.to(exp.attention_mask.dtype), q


def responses(tensor: torch.Tensor, c: Cut) -> torch.Tensor:
    """A response-aligned ``(B, T)`` buffer tensor's rows of the cut, ``c.response_width`` wide."""
    return tensor[c.rows.to(tensor.device), : c.response_width]


def computed_positions(cuts: list[Cut]) -> int:
    return sum(c.positions for c in cuts)


def padding_record(exp: Experience, ppo: PPOConfig, sizes: PPOSizes, iteration: int) -> dict[str, float]:
    """Positions the iteration's forwards compute per real (unpadded) token, over every process: ``batch/full``
    for forwards at the buffer's width (what they would cost uncut), ``batch/scoring`` for the four scoring
    forwards, ``batch/update`` for the policy's and critic's update forwards (the first epoch's cuts; later epochs
    group another permutation alike), and the update's micro-batches per minibatch."""
    real = distributed.global_sum(sum(exp.query_lengths) + sum(exp.response_lengths))
    policy_cuts = policy_scoring_cuts(exp, ppo, sizes, iteration)
    scoring = (computed_positions(policy_cuts) + computed_positions(scoring_cuts(exp, ppo))) / 2
    return {
        "batch/full_positions_per_token": distributed.global_sum(exp.query_responses.numel()) / real,
        "batch/scoring_positions_per_token": distributed.global_sum(scoring) / real,
        "batch/update_positions_per_token": distributed.global_sum(computed_positions(policy_cuts)) / real,
        "batch/update_micro_batches": len(policy_cuts) / sizes.minibatches,
    }

"""The typed batch the PPO phases hand to each other: one rank's share of an experience buffer.

Sampling fills the rollout fields, scoring the per-token tensors of the four models, shaping the rewards,
advantages and returns; the update reads them all. Per-token tensors are response-aligned ``(B, T)``: position t
holds response token t (DESIGN.md vocabulary). B is this rank's rollout size, Tq the left-padded query width and
T the response width of this buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Experience:
    prompts: list[str]  # B prompts as the data holds them
    texts: list[str]  # B decoded responses, stripped
    queries: torch.Tensor  # (B, Tq) query ids, left-padded
    responses: torch.Tensor  # (B, T) sampled ids; the pad id after the first EOS
    query_responses: torch.Tensor  # (B, Tq + T) queries then responses: what every model reads
    attention_mask: torch.Tensor  # (B, Tq + T) 0 on the query's left padding and after the response's EOS
    response_mask: torch.Tensor  # (B, T) float, 1 on response tokens up to and including EOS
    eos: torch.Tensor  # (B,) bool: the response ended with EOS (else it hit the length cap)
    pad_id: int  # the tokenizer's pad id: what fills a forward's rows after their last token
    # scoring (no gradient): log-probs at the sampling temperature, as the update recomputes them
    logprobs: torch.Tensor | None = None  # (B, T) log pi_old(a_t | s_t)
    ref_logprobs: torch.Tensor | None = None  # (B, T) log pi_ref(a_t | s_t)
    values: torch.Tensor | None = None  # (B, T) V_old(s_t) from the critic
    scores: torch.Tensor | None = None  # (B,) raw reward-model score of each response
    nll: torch.Tensor | None = None  # (B, T) -log pi at temperature 1 (perplexity monitor)
    ref_nll: torch.Tensor | None = None  # (B, T) -log pi_ref at temperature 1
    entropy: torch.Tensor | None = None  # (B, T) policy entropy at the sampling temperature
    gold_scores: list[float] | None = None  # B gold-judge scores (simulated domain; monitoring only)
    # shaping
    rewards: torch.Tensor | None = None  # (B, T) KL-shaped per-token rewards, the processed score on the last token
    advantages: torch.Tensor | None = None  # (B, T) GAE advantages
    returns: torch.Tensor | None = None  # (B, T) advantages + values: the critic's targets (None without a critic)
    group_ids: torch.Tensor | None = None  # (B,) which of the rollout's prompts each row answers

    @property
    def query_width(self) -> int:
        return self.queries.shape[1]

    @property
    def response_width(self) -> int:
        return self.responses.shape[1]

    @cached_property
    def query_lengths(self) -> list[int]:
        """Real (unpadded) query tokens of each row."""
        return self.attention_mask[:, : self.query_width].sum(dim=1).tolist()

    @cached_property
    def response_lengths(self) -> list[int]:
        """Real response tokens of each row, EOS included."""
        return self.response_mask.sum(dim=1).long().tolist()

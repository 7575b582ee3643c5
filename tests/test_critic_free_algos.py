"""Critic-free advantages (GRPO, RLOO, REINFORCE++'s returns) on hand-computed numbers and invariances."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.algos.critic_free import (
    broadcast_to_tokens,
    discounted_returns,
    grpo_advantages,
    rloo_advantages,
)
from rlhf_core.algos.ppo import kl_shaped_rewards

# Two prompts, interleaved and with ids that are not 0..G-1: prompt 7 answered 1, 2, 3; prompt 3 answered 0, 4.
SCORES = torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0])
GROUPS = torch.tensor([7, 3, 7, 7, 3])


def test_grpo_by_hand():
    # prompt 7: mean 2, sample std 1 -> -1, 0, 1; prompt 3: mean 2, sample std sqrt(8) -> -/+ 2 / sqrt(8)
    expected = torch.tensor([-1.0, -2 / math.sqrt(8), 0.0, 1.0, 2 / math.sqrt(8)])
    torch.testing.assert_close(grpo_advantages(SCORES, GROUPS, eps=0.0), expected)
    assert grpo_advantages(SCORES, GROUPS).dtype == SCORES.dtype


def test_rloo_by_hand():
    # prompt 7: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; prompt 3: 0 - 4, 4 - 0
    expected = torch.tensor([-1.5, -4.0, 0.0, 1.5, 4.0])
    torch.testing.assert_close(rloo_advantages(SCORES, GROUPS), expected)


def test_rloo_is_the_centred_score_scaled_by_k_over_k_minus_1():
    torch.manual_seed(0)
    scores = torch.randn(12, dtype=torch.float64)
    groups = torch.arange(3).repeat_interleave(4)  # 3 prompts x 4 answers
    centred = scores - scores.view(3, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(rloo_advantages(scores, groups), centred * 4 / 3)


def test_group_estimators_ignore_what_the_group_shares():
    """A per-prompt offset (an easier prompt) changes nothing; GRPO ignores a per-prompt positive scale too, and
    both follow a shuffle of the rows."""
    offset = torch.tensor([10.0, -5.0, 10.0, 10.0, -5.0])
    torch.testing.assert_close(rloo_advantages(SCORES + offset, GROUPS), rloo_advantages(SCORES, GROUPS))
    scale = torch.tensor([3.0, 0.5, 3.0, 3.0, 0.5])
    torch.testing.assert_close(grpo_advantages(SCORES * scale + offset, GROUPS, eps=0.0),
                               grpo_advantages(SCORES, GROUPS, eps=0.0))  # fmt: skip
    order = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(grpo_advantages(SCORES[order], GROUPS[order]), grpo_advantages(SCORES, GROUPS)[order])
    torch.testing.assert_close(rloo_advantages(SCORES[order], GROUPS[order]), rloo_advantages(SCORES, GROUPS)[order])


def test_advantages_sum_to_zero_within_each_group():
    for advantages in (grpo_advantages(SCORES, GROUPS), rloo_advantages(SCORES, GROUPS)):
        assert abs(float(advantages[GROUPS == 7].sum())) < 1e-6
        assert abs(float(advantages[GROUPS == 3].sum())) < 1e-6


def test_a_group_of_equal_scores_teaches_nothing_and_a_group_of_one_is_an_error():
    scores, groups = torch.tensor([0.5, 0.5, 0.5, 1.0, 2.0]), torch.tensor([0, 0, 0, 1, 1])
    assert grpo_advantages(scores, groups)[:3].tolist() == [0.0, 0.0, 0.0]
    assert rloo_advantages(scores, groups)[:3].tolist() == [0.0, 0.0, 0.0]
    for estimator in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="at least 2 answers"):
            estimator(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"should both be \(B,\)"):
        grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def test_discounted_returns_by_hand_and_padding_cannot_leak():
    rewards = torch.tensor([[0.1, -0.2, 1.0, float("nan")], [0.5, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(discounted_returns(rewards, mask),
                               torch.tensor([[0.9, 0.8, 1.0, 0.0], [2.5, 2.0, 0.0, 0.0]]))  # fmt: skip
    # gamma 0.5: G2 = 1.0, G1 = -0.2 + 0.5, G0 = 0.1 + 0.15
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5)[0],
                               torch.tensor([0.25, 0.3, 1.0, 0.0]))  # fmt: skip


def test_reinforce_pp_return_is_the_score_minus_the_kl_still_to_come():
    """With the KL-shaped reward of PPO, the return at token t is the score minus kl_coef times the KL of tokens
    t.. (gamma 1): the KL the answer has yet to spend."""
    kl = torch.tensor([[0.2, 0.4, 0.1, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = kl_shaped_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[2.0 - 0.35, 2.0 - 0.25, 2.0 - 0.05, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask), expected)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask),
                               torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))  # fmt: skip
    with pytest.raises(ValueError, match="should be"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0, 3.0]), mask)

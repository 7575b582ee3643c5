"""Phases 3-5 of a PPO iteration on numbers worked out by hand: reward processing, KL-shaped rewards, GAE, and
the per-minibatch advantage normalisation with moments over every rank."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.algos.masked import masked_sums, whiten
from rlhf_core.algos.ppo import moments_from_sums, penalise_missing_eos
from rlhf_core.config import PRESETS, PPOConfig
from rlhf_core.trainers.ppo.shaping import minibatch_advantages, shape_rewards

# Two responses: three tokens, and two tokens plus padding (whose value 9.0 must not leak anywhere).
SCORES = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
LOGPROBS = torch.tensor([[-1.0, -0.5, -0.2], [-0.3, -0.4, 0.0]])
REF_LOGPROBS = torch.tensor([[-1.2, -0.5, -0.1], [-0.1, -0.4, 0.0]])
VALUES = torch.tensor([[0.5, 0.25, 0.0], [0.1, -0.2, 9.0]])
PPO = PPOConfig(gamma=1.0, lam=0.5, reward_clip=1.0)
RUNNING_MEAN, RUNNING_STD = 0.5, 2.0


def _shape(tricks, kl_coef):
    return shape_rewards(SCORES, LOGPROBS, REF_LOGPROBS, VALUES, MASK, tricks, PPO, RUNNING_MEAN, RUNNING_STD, kl_coef)


def test_ppo_max_shaping_by_hand():
    """Normalise (1 - 0.5) / 2 = 0.25 and (-2 - 0.5) / 2 = -1.25, clip the second to -1; k1 KL per token
    [0.2, 0, -0.1] and [-0.2, 0]; rewards -0.1 x KL plus the score on the last token; GAE with gamma 1, lambda 0.5:
    row 0: deltas 0.26, -0.25, -0.27 -> A = 0.26, -0.12, -0.33; row 1: deltas -0.8, -0.28 -> A = -0.8, -0.68."""
    shaped = _shape(PRESETS["ppo_max"], kl_coef=0.1)
    torch.testing.assert_close(shaped.scores, torch.tensor([0.25, -1.0]))
    torch.testing.assert_close(shaped.kl, torch.tensor([[0.2, 0.0, -0.1], [-0.2, 0.0, 0.0]]))
    torch.testing.assert_close(shaped.rewards, torch.tensor([[-0.02, 0.0, 0.26], [0.02, -1.0, 0.0]]))
    torch.testing.assert_close(shaped.advantages, torch.tensor([[-0.33, -0.12, 0.26], [-0.68, -0.8, 0.0]]))
    torch.testing.assert_close(shaped.returns, torch.tensor([[0.17, 0.13, 0.26], [-0.58, -1.0, 0.0]]))


def test_presets_shape_differently():
    # moss_released scales without centring (1 / 2, -2 / 2) and does not clip; its KL coefficient is 0.01.
    moss = _shape(PRESETS["moss_released"], kl_coef=0.01)
    torch.testing.assert_close(moss.scores, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(moss.rewards, torch.tensor([[-0.002, 0.0, 0.501], [0.002, -1.0, 0.0]]))
    # vanilla: the raw score on the last token and nothing else (no KL term, whatever the policies' distance).
    vanilla = _shape(PRESETS["vanilla"], kl_coef=0.0)
    torch.testing.assert_close(vanilla.scores, SCORES)
    torch.testing.assert_close(vanilla.rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]]))


def test_each_shaping_switch_changes_only_what_it_should():
    off = PRESETS["vanilla"]
    base = _shape(off, kl_coef=0.0)
    for switch, expected_scores in (("reward_norm", [0.25, -1.25]), ("reward_scaling", [0.5, -1.0]),
                                    ("reward_clip", [1.0, -1.0])):  # fmt: skip
        shaped = _shape(off.model_copy(update={switch: True}), kl_coef=0.0)
        torch.testing.assert_close(shaped.scores, torch.tensor(expected_scores), msg=switch)
        torch.testing.assert_close(shaped.kl, base.kl, msg=switch)  # the KL is no business of theirs
    # The estimator changes the KL term; it reaches the rewards only with a coefficient (the penalty switched on).
    k3 = _shape(off.model_copy(update={"kl_estimator": "k3"}), kl_coef=0.0)
    torch.testing.assert_close(k3.rewards, base.rewards)
    lr = LOGPROBS - REF_LOGPROBS
    torch.testing.assert_close(k3.kl, (torch.expm1(-lr) + lr) * MASK)
    penalised = _shape(off.model_copy(update={"kl_estimator": "k3"}), kl_coef=0.5)
    torch.testing.assert_close(penalised.rewards - base.rewards, -0.5 * k3.kl)


def test_missing_eos_penalty():
    torch.testing.assert_close(
        penalise_missing_eos(SCORES, torch.tensor([True, False]), 0.5), torch.tensor([1.0, -2.5])
    )
    unchanged = penalise_missing_eos(SCORES, torch.tensor([True, False]), None)
    assert torch.equal(unchanged, SCORES) and unchanged is not SCORES


def test_minibatch_advantages_whiten_with_the_moments_given_then_clip():
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    off = PRESETS["vanilla"]
    assert torch.equal(minibatch_advantages(advantages, mask, off, 0.5), advantages)
    # Masked entries 1, 2, 3, 4: mean 2.5, population variance 1.25.
    moments = moments_from_sums(*masked_sums(advantages, mask).tolist())
    assert moments == pytest.approx((4.0, 2.5, 1.25))
    whitened = minibatch_advantages(advantages, mask, off.model_copy(update={"advantage_norm": True}), 0.5, moments)
    expected = (torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]) - 2.5) / 1.25**0.5 * mask
    torch.testing.assert_close(whitened, expected)
    both = off.model_copy(update={"advantage_norm": True, "advantage_clip": True})
    torch.testing.assert_close(minibatch_advantages(advantages, mask, both, 0.5, moments), expected.clamp(-0.5, 0.5))
    with pytest.raises(ValueError, match="needs the minibatch's moments"):
        minibatch_advantages(advantages, mask, both, 0.5)


def test_moments_of_shards_summed_equal_the_moments_of_the_whole():
    """What the trainer all-reduces: per-rank [n, sum, sum of squares]; whitening with the merged moments is the
    whitening of the concatenated minibatch, whichever way it is split over ranks."""
    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    whole = moments_from_sums(*masked_sums(values, mask).tolist())
    split = moments_from_sums(*(masked_sums(values[:2], mask[:2]) + masked_sums(values[2:], mask[2:])).tolist())
    assert split == pytest.approx(whole, rel=1e-12)
    torch.testing.assert_close(whiten(values[2:], mask[2:], *split[1:]), whiten(values, mask, *whole[1:])[2:])
    nan_in_padding = values.masked_fill(mask == 0, float("nan"))
    assert masked_sums(nan_in_padding, mask).isfinite().all()

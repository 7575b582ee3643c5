"""PPO math on hand-computed numbers, naive reference implementations, and invariances (the `ppo` stage uses these)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf_core.algos.masked import masked_mean, masked_sums, whiten
from rlhf_core.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_advantages,
    clip_scores,
    entropy_from_logits,
    entropy_loss,
    gae_advantages,
    kl_penalty,
    kl_shaped_rewards,
    logprobs_from_logits,
    moments_from_sums,
    normalize_scores,
    policy_loss,
    repetition_rate,
    scale_scores,
    value_loss,
)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _assert_values(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=atol)


def _lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


# ------------------------------------------------------------------------------------------------ masked additions


def _moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, population var) of the masked positions, the way the trainer gets them: sums, then moments."""
    _, mean, var = moments_from_sums(*masked_sums(values, mask).tolist())
    return mean, var


def test_masked_sums_and_their_moments_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 100.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Masked values 1, 2, 3, 5: n 4, sum 11, sum of squares 39; mean 11/4, var 39/4 - (11/4)^2 = 8.75 / 4.
    assert masked_sums(values, mask).tolist() == [4.0, 11.0, 39.0]
    assert _moments(values, mask) == pytest.approx((2.75, 8.75 / 4))
    assert _moments(values, mask)[1] == pytest.approx(statistics.pvariance([1, 2, 3, 5]))
    with pytest.raises(ValueError, match="empty mask"):
        masked_sums(values, torch.zeros_like(mask))


def test_masked_sums_ignore_nan_and_inf_in_padding():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sums(values, mask).tolist() == [3.0, 6.0, 14.0]
    assert _moments(values, mask)[1] == pytest.approx(statistics.pvariance([1, 2, 3]))


def test_whiten_standardises_masked_positions_and_zeros_padding():
    torch.manual_seed(0)
    values = torch.randn(4, 7) * 3 + 5
    mask = _lengths_mask([7, 3, 5, 1], 7)
    before = values.clone()
    white = whiten(values, mask, *_moments(values, mask))
    assert torch.equal(values, before)  # no mutation
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert _moments(white, mask)[1] == pytest.approx(1.0, abs=1e-5)
    assert white[mask == 0].abs().sum().item() == 0.0
    # By hand on [1, 3]: mean 2, var 1 -> [-1, 1].
    small = torch.tensor([[1.0, 3.0, 9.0]])
    assert whiten(small, torch.tensor([[1, 1, 0]]), 2.0, 1.0, eps=0.0).tolist() == [[-1.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------------------------- log-probabilities


def test_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])  # probs [1/4, 3/4] and [1/2, 1/2]
    tokens = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (1, 2)
    _assert_values(out, [[math.log(0.75), math.log(0.5)]])
    # Temperature 0.5 doubles the logits: probs [1/10, 9/10] for the first position.
    hot = logprobs_from_logits(logits, tokens, temperature=0.5)
    assert hot[0, 0].item() == pytest.approx(math.log(0.9))


@pytest.mark.parametrize("temperature", [1.0, 0.8, 1.7])
def test_logprobs_and_entropy_match_categorical(temperature):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    dist = torch.distributions.Categorical(logits=logits / temperature)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature), dist.log_prob(tokens))
    torch.testing.assert_close(entropy_from_logits(logits, temperature), dist.entropy())


def test_temperature_sharpens_and_flattens():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=gen)
    cold, base, warm = (entropy_from_logits(logits, t) for t in (0.5, 1.0, 2.0))
    assert bool((cold < base).all()) and bool((base < warm).all())
    # The argmax token gains probability as the temperature drops.
    top = logits.argmax(-1)
    assert bool((logprobs_from_logits(logits, top, 0.5) > logprobs_from_logits(logits, top, 1.0)).all())
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, top, 0.0)


def test_entropy_by_hand_and_stable_for_extreme_logits():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    # probs [1/4, 3/4]: H = -(1/4 log 1/4 + 3/4 log 3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert entropy_from_logits(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # One logit dominates so much that the others underflow to probability 0: entropy 0, not NaN.
    peaked = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_half_precision_logits_are_promoted():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, 6, (2, 3), generator=gen)
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), tokens))
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_logits(logits, tokens[:, :2])


# ---------------------------------------------------------------------------------------------------- KL penalty


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    logq = torch.log(torch.tensor([[0.25, 0.4]]))
    # l = log 2 and log 0.5.
    l1, l2 = math.log(2.0), math.log(0.5)
    _assert_values(kl_penalty(logp, logq, "k1"), [[l1, l2]])
    _assert_values(kl_penalty(logp, logq, "k2"), [[0.5 * l1**2, 0.5 * l2**2]])
    # k3 = q/p - 1 - log(q/p): q/p = 0.5 -> 0.5 - 1 + log 2; q/p = 2 -> 2 - 1 - log 2.
    _assert_values(kl_penalty(logp, logq, "k3"), [[-0.5 + math.log(2), 1 - math.log(2)]])
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0
    with pytest.raises(ValueError, match="unknown estimator"):
        kl_penalty(logp, logq, "k4")


def test_k3_and_k2_are_never_negative():
    gen = torch.Generator().manual_seed(6)
    logp, logq = torch.randn(50, 40, generator=gen) * 3, torch.randn(50, 40, generator=gen) * 3
    assert bool((kl_penalty(logp, logq, "k3") >= 0).all())
    assert bool((kl_penalty(logp, logq, "k2") >= 0).all())
    assert bool((kl_penalty(logp, logq, "k1") < 0).any())  # k1 is unbiased but not pointwise positive


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_approximate_the_exact_kl(estimator):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # about 0.2190
    gen = torch.Generator().manual_seed(7)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen).view(1, -1)
    estimate = kl_penalty(p.log()[samples], q.log()[samples], estimator).mean().item()
    assert estimate == pytest.approx(exact, abs=0.01)


def test_fixed_controller_is_constant_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_controller_by_hand_and_clipped():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    # KL 7.5 -> error 0.25 clipped to 0.2; value *= 1 + 0.2 * 256 / 10000 = 1.00512.
    ctl.update(current_kl=7.5, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    # KL 6.6 -> error 0.1 (inside the clip); value *= 1 + 0.1 * 100 / 10000 = 1.001.
    ctl.update(current_kl=6.6, n_steps=100)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 1.001)
    # KL 0 -> error -1 clipped to -0.2; value *= 1 - 0.2 * 5000 / 10000 = 0.9.
    ctl.update(current_kl=0.0, n_steps=5000)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 1.001 * 0.9)
    # On target: unchanged.
    value = ctl.value
    ctl.update(current_kl=6.0, n_steps=5000)
    assert ctl.value == pytest.approx(value)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ctl.update(3.0, 10)
    fresh = AdaptiveKLController(0.2, target=1.0, horizon=100)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value != 0.2
    ctl.update(0.5, 7)
    fresh.update(0.5, 7)
    assert fresh.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ---------------------------------------------------------------------------------------------- reward shaping


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 9.0, 9.0], [1.0, 9.0, 9.0, 9.0]])
    mask = _lengths_mask([4, 2, 1], 4)
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    expected = [
        [-0.01, -0.02, -0.03, -0.04 + 1.0],
        [-0.05, 0.05 + 2.0, 0.0, 0.0],
        [-0.1 + 3.0, 0.0, 0.0, 0.0],
    ]
    _assert_values(rewards, expected)
    # Sum over tokens = score - coef * sum of KL over real tokens.
    assert rewards.sum(1).tolist() == pytest.approx([1.0 - 0.1, 2.0, 3.0 - 0.1])


def test_kl_shaped_rewards_generic_last_index_and_errors():
    kl = torch.zeros(2, 4)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]])  # not a prefix: the last 1 still receives the score
    rewards = kl_shaped_rewards(torch.tensor([5.0, 7.0]), kl, mask, kl_coef=1.0)
    assert rewards.tolist() == [[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 7.0, 0.0]]
    with pytest.raises(ValueError, match="no real token"):
        kl_shaped_rewards(torch.tensor([1.0, 1.0]), kl, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        kl_shaped_rewards(torch.tensor([1.0]), kl, mask, 0.1)


# ----------------------------------------------------------------------------------------------------------- GAE


def _naive_gae(rewards, values, lengths, gamma, lam):
    """Per-sample, per-token textbook GAE on Python floats (the reference for the vectorised version)."""
    batch, width = rewards.shape
    adv = [[0.0] * width for _ in range(batch)]
    ret = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_value = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_value - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b][t] = total
            ret[b][t] = total + values[b, t].item()
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 50.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.5
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.9*0.4 - 0.2 = 0.16; d0 = 0 + 0.9*0.2 - 0.5 = -0.32.
    # A2 = 0.6; A1 = 0.16 + 0.45*0.6 = 0.43; A0 = -0.32 + 0.45*0.43 = -0.1265.
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    _assert_values(adv, [[-0.1265, 0.43, 0.6, 0.0]])
    _assert_values(ret, [[-0.1265 + 0.5, 0.43 + 0.2, 0.6 + 0.4, 0.0]])


def test_gae_gamma_lambda_one_gives_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    values = torch.tensor([[0.3, -0.1, 0.7], [1.0, 2.0, 3.0]])
    adv, ret = gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0)
    # With gamma = lam = 1 the return is the undiscounted reward-to-go, independent of the values.
    _assert_values(ret, [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])
    _assert_values(adv, [[5.7, 5.1, 2.3], [8.0, 3.0, 0.0]])
    # lam = 0: one-step TD errors.
    adv0, _ = gae_advantages(rewards, values, MASK, gamma=1.0, lam=0.0)
    _assert_values(adv0, [[1.0 - 0.1 - 0.3, 2.0 + 0.7 + 0.1, 3.0 - 0.7], [4.0 + 2.0 - 1.0, 3.0, 0.0]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_naive_loop(seed, gamma, lam):
    gen = torch.Generator().manual_seed(seed)
    batch, width = 5, 9
    lengths = torch.randint(1, width + 1, (batch,), generator=gen).tolist()
    rewards = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, _lengths_mask(lengths, width), gamma, lam)
    ref_adv, ref_ret = _naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_ignores_padding_values_and_rewards():
    gen = torch.Generator().manual_seed(8)
    mask = _lengths_mask([6, 2, 4], 6)
    rewards, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    values.requires_grad_(True)
    adv, ret = gae_advantages(rewards, values, mask, 0.99, 0.95)
    for junk_r, junk_v in ((1e4, -1e4), (float("nan"), float("inf"))):
        garbage_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, junk_r))
        garbage_v = torch.where(mask.bool(), values.detach(), torch.full_like(rewards, junk_v))
        adv2, ret2 = gae_advantages(garbage_r, garbage_v, mask, 0.99, 0.95)
        torch.testing.assert_close(adv, adv2)
        torch.testing.assert_close(ret, ret2)
    assert adv[mask == 0].abs().sum().item() == 0.0 and ret[mask == 0].abs().sum().item() == 0.0
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_with_a_non_prefix_mask():
    gen = torch.Generator().manual_seed(12)
    rewards, values = torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen)
    right = torch.tensor([[1, 1, 1, 0]])
    adv_right, ret_right = gae_advantages(rewards, values, right, 0.9, 0.8)
    # The same 3-token episode left-padded: real positions match, padding stays 0.
    left = torch.tensor([[0, 1, 1, 1]])
    adv_left, ret_left = gae_advantages(rewards.roll(1, 1), values.roll(1, 1), left, 0.9, 0.8)
    torch.testing.assert_close(adv_left, adv_right.roll(1, 1))
    torch.testing.assert_close(ret_left, ret_right.roll(1, 1))
    # A hole ends the episode: tokens before it see V = 0 and A = 0 beyond them.
    holed = torch.tensor([[1, 1, 0, 1]])
    adv_holed, _ = gae_advantages(rewards, values, holed, 0.9, 0.8)
    head, _ = gae_advantages(rewards[:, :2], values[:, :2], torch.ones(1, 2), 0.9, 0.8)
    tail, _ = gae_advantages(rewards[:, 3:], values[:, 3:], torch.ones(1, 1), 0.9, 0.8)
    torch.testing.assert_close(adv_holed, torch.cat([head, torch.zeros(1, 1), tail], dim=1))


def test_gae_does_not_mutate_inputs():
    rewards, values = torch.ones(2, 3), torch.full((2, 3), 0.5)
    r0, v0 = rewards.clone(), values.clone()
    gae_advantages(rewards, values, MASK, 1.0, 0.95)
    assert torch.equal(rewards, r0) and torch.equal(values, v0)


# ----------------------------------------------------------------------------------------- score reparameterisation


def _merge_batch(moments: RunningMoments, batch: torch.Tensor) -> None:
    d = batch.double().flatten()
    moments.merge(*moments_from_sums(d.numel(), d.sum(), d.square().sum()))


def test_running_moments_match_the_concatenated_stream():
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randn(size, generator=gen) * 2 + 3 for size in (1, 7, 64, 3, 250)]
    moments = RunningMoments()
    assert (moments.mean, moments.std, moments.count) == (0.0, 1.0, 0.0)
    seen: list[float] = []
    for batch in batches:
        _merge_batch(moments, batch)
        seen += batch.double().tolist()
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(statistics.fmean(seen), rel=1e-9, abs=1e-12)
        assert moments.std == pytest.approx(statistics.pstdev(seen), rel=1e-9, abs=1e-12)


def test_running_moments_first_merge_adopts_the_batch():
    moments = RunningMoments()
    moments.merge(4, 5.0, 5.0)  # 2, 4, 6, 8
    assert (moments.count, moments.mean, moments.var) == (4.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        moments.merge(-1, 0.0, 1.0)


def test_running_moments_merge_of_halves_equals_one_merge_of_the_whole():
    gen = torch.Generator().manual_seed(10)
    data = torch.randn(101, generator=gen) * 5 - 1
    whole = RunningMoments()
    _merge_batch(whole, data)
    # As the trainer does across ranks: per-shard [n, sum, sum_sq] -> moments -> merge.
    merged = RunningMoments()
    for shard in (data[:40], data[40:]):
        d = shard.double()
        merged.merge(*moments_from_sums(d.numel(), d.sum(), d.square().sum()))
    assert merged.count == whole.count
    assert merged.mean == pytest.approx(whole.mean, rel=1e-12)
    assert merged.std == pytest.approx(whole.std, rel=1e-9)
    merged.merge(0, 123.0, 45.0)  # an empty shard changes nothing
    assert merged.mean == pytest.approx(whole.mean, rel=1e-12)


def test_moments_from_sums_by_hand():
    # 1, 2, 3, 6: n 4, sum 12, sum_sq 50 -> mean 3, var 50/4 - 9 = 3.5.
    assert moments_from_sums(4, 12.0, 50.0) == (4.0, 3.0, 3.5)
    assert moments_from_sums(torch.tensor(2.0), torch.tensor(2.0), torch.tensor(2.0)) == (2.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="count"):
        moments_from_sums(0, 0.0, 0.0)


def test_running_moments_state_round_trip():
    moments = RunningMoments()
    _merge_batch(moments, torch.tensor([1.0, 5.0, 9.0]))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()
    _merge_batch(moments, torch.tensor([-3.0]))
    _merge_batch(restored, torch.tensor([-3.0]))
    assert (restored.mean, restored.std, restored.count) == (moments.mean, moments.std, moments.count)


def test_normalise_scale_clip_by_hand():
    scores = torch.tensor([1.0, 3.0, 7.0])
    assert normalize_scores(scores, mean=3.0, std=2.0, eps=0.0).tolist() == [-1.0, 0.0, 2.0]
    assert scale_scores(scores, std=2.0, eps=0.0).tolist() == [0.5, 1.5, 3.5]
    assert normalize_scores(scores, 3.0, 0.0).tolist() == pytest.approx([-2e8, 0.0, 4e8])  # eps guards std = 0
    assert clip_scores(torch.tensor([-9.0, 0.4, 9.0]), 5.0).tolist() == pytest.approx([-5.0, 0.4, 5.0])
    assert clip_advantages(torch.tensor([[-2.0, 0.5], [3.0, 1.0]]), 1.0).tolist() == [[-1.0, 0.5], [1.0, 1.0]]
    with pytest.raises(ValueError):
        clip_scores(scores, 0.0)
    with pytest.raises(ValueError):
        clip_advantages(scores, -1.0)


# ---------------------------------------------------------------------------------------------------------- losses


def _policy_case():
    # ratios [[1.5, 0.9], [0.5, 2.0]] with padding at (1, 1); advantages [[2, -1], [-3, 4]]; eps 0.2.
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 2.0]]))
    adv = torch.tensor([[2.0, -1.0], [-3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, adv, mask


def test_policy_loss_by_hand_with_clipping():
    logp, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # (0,0): A=2, rho=1.5: max(-3.0, -2*1.2=-2.4) = -2.4 (clipped).
    # (0,1): A=-1, rho=0.9 inside the range: 0.9.
    # (1,0): A=-3, rho=0.5: max(1.5, 3*0.8=2.4) = 2.4 (clipped: pessimistic bound keeps the larger loss).
    assert loss.item() == pytest.approx((-2.4 + 0.9 + 2.4) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # approxkl = mean((rho - 1) - log rho).
    by_hand = ((0.5 - math.log(1.5)) + (-0.1 - math.log(0.9)) + (-0.5 - math.log(0.5))) / 3
    assert stats["approxkl"].item() == pytest.approx(by_hand, rel=1e-5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5) / 3)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())


def test_clipping_only_applies_in_the_direction_of_the_advantage():
    # rho = 1.5 with a negative advantage: unclipped -(-1)*1.5 = 1.5 > clipped 1.2, so the unclipped term stays.
    logp = torch.log(torch.tensor([[1.5]]))
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.5)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_without_clip_is_the_plain_surrogate():
    logp, old, adv, mask = _policy_case()
    loss, _ = policy_loss(logp, old, adv, mask, cliprange=0.2, clip=False)
    assert loss.item() == pytest.approx((-3.0 + 0.9 + 1.5) / 3)
    gen = torch.Generator().manual_seed(11)
    logp, old, adv = (torch.randn(3, 4, generator=gen) * 0.1 for _ in range(3))
    mask = _lengths_mask([4, 1, 3], 4)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, clip=False)
    torch.testing.assert_close(loss, masked_mean(-adv * torch.exp(logp - old), mask))


def test_policy_gradient_vanishes_where_clipping_is_active():
    logp, old, adv, mask = _policy_case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, cliprange=0.2)
    loss.backward()
    grad = logp.grad
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() == 0.0  # clipped tokens
    assert grad[1, 1].item() == 0.0  # padding
    # Unclipped token: d/dlogp of -A * exp(logp - old) / 3 = -A * rho / 3 = 0.9 / 3.
    assert grad[0, 1].item() == pytest.approx(0.3)


def test_policy_loss_survives_inf_in_padding():
    logp, old, adv, mask = _policy_case()
    logp = logp.clone()
    logp[1, 1] = float("inf")
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(logp.grad).all())
    assert all(math.isfinite(s.item()) for s in stats.values())


def test_value_loss_by_hand_with_clipping():
    values = torch.tensor([[1.0, 0.5, 9.0], [2.0, -1.0, 9.0]])
    old = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.5, 0.0], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # (0,0): V=1 clipped to 0.7; (1-0)^2=1 vs 0.49 -> 1.
    # (0,1): V=V_old=0.5: 1 vs 1 -> 1 (tie, not counted as clipped).
    # (1,0): V=2 clipped to 1.2; 0 vs 0.64 -> 0.64 (clipped term larger).
    # (1,1): V=-1 clipped to -0.2; 4 vs 1.44 -> 4.
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 0.64 + 4) / 4)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)
    assert stats["values_mean"].item() == pytest.approx((1.0 + 0.5 + 2.0 - 1.0) / 4)
    plain, _ = value_loss(values, old, returns, mask, cliprange_value=0.2, clip=False)
    assert plain.item() == pytest.approx(0.5 * (1 + 1 + 0 + 4) / 4)


def test_value_loss_gradient_vanishes_where_the_clipped_term_wins():
    values = torch.tensor([[2.0, 0.3]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, _ = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    loss.backward()
    # (0,0): clipped value 1.2 is constant in V -> no gradient. (0,1): V=0.3 clipped to 0.2, (0.3-1)^2 = 0.49 <
    # (0.2-1)^2 = 0.64, also clipped -> no gradient either.
    assert values.grad.tolist() == [[0.0, 0.0]]
    values2 = torch.tensor([[0.9]], requires_grad=True)  # inside the range: d/dV 0.5 (V - R)^2 = V - R
    loss2, _ = value_loss(values2, torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    loss2.backward()
    assert values2.grad.item() == pytest.approx(-1.1)


def test_entropy_loss_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = entropy_loss(entropy, mask)
    assert loss.item() == pytest.approx(-2.0)
    assert stats["entropy"].item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), m, 0.2),
        lambda m: value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), m, 0.2),
        lambda m: entropy_loss(torch.ones(2, 3), m),
        lambda m: whiten(torch.ones(2, 3), m, 0.0, 1.0),
        lambda m: masked_sums(torch.ones(2, 3), m),
        lambda m: kl_shaped_rewards(torch.ones(2), torch.zeros(2, 3), m, 0.1),
    ],
)
def test_averaging_functions_refuse_an_empty_mask(call):
    with pytest.raises(ValueError, match="empty mask"):
        call(torch.zeros(2, 3, dtype=torch.long))


def test_losses_do_not_mutate_inputs():
    logp, old, adv, mask = _policy_case()
    copies = [t.clone() for t in (logp, old, adv, mask)]
    policy_loss(logp, old, adv, mask, 0.2)
    value_loss(logp, old, adv, mask, 0.2)
    assert all(torch.equal(a, b) for a, b in zip((logp, old, adv, mask), copies, strict=True))


# ---------------------------------------------------------------------------------------------------------- health


def test_repetition_rate_by_hand():
    a, b, c, pad = 5, 6, 7, 0
    tokens = torch.tensor(
        [
            [a, b, a, b, a, b],  # bigrams ab ba ab ba ab: 3 of 5 repeat
            [a, b, c, a, pad, pad],  # bigrams ab bc ca: none repeat
            [a, a, a, a, a, a],  # 5 bigrams, all but the first repeat
            [a, pad, pad, pad, pad, pad],  # a single token has no bigram
        ]
    )
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    assert repetition_rate(tokens, mask, n=2).tolist() == pytest.approx([0.6, 0.0, 0.8, 0.0])
    # Trigrams of "a b a b a b": aba bab aba bab -> 2 of 4 repeat; unigrams: 4 of 6 repeat.
    assert repetition_rate(tokens[:1], mask[:1], n=3).item() == pytest.approx(0.5)
    assert repetition_rate(tokens[:1], mask[:1], n=1).item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        repetition_rate(tokens, mask, n=0)


def test_repetition_rate_respects_the_mask():
    a, b = 5, 6
    # Padding that repeats the response must not count; with the mask the response is "a b a" (ab ba: 0 repeats).
    tokens = torch.tensor([[a, b, a, b, a, b]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert repetition_rate(tokens, mask, n=2).tolist() == [0.0]
    assert repetition_rate(tokens, torch.ones_like(mask), n=2).tolist() == pytest.approx([0.6])


def test_ensemble_scores_by_hand():
    from rlhf_core.algos.ppo import ensemble_scores

    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # two reward models (rows) on two responses
    means, stds = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    # z: member 0 -> [0, 1], member 1 -> [0, 0]. Response 0: they agree (z 0). Response 1: mean 0.5, std 0.5.
    assert ensemble_scores(scores, means, stds, penalty=0.0).tolist() == [1.0, 2.0]  # 1 + 2 x 0.5 for the second
    assert ensemble_scores(scores, means, stds, penalty=1.0).tolist() == [1.0, 1.0]  # disagreement costs 0.5 std
    one = torch.tensor([[0.3, -1.7, 4.0]])  # a single model gives back its own scores, whatever the penalty
    assert torch.allclose(ensemble_scores(one, torch.tensor([0.5]), torch.tensor([2.0]), 3.0), one[0])
    with pytest.raises(ValueError, match="ensemble_scores"):
        ensemble_scores(scores, means[:1], stds[:1], 1.0)


def test_score_length_fit_and_its_removal_by_hand():
    from rlhf_core.algos.ppo import remove_length_term
    from rlhf_core.algos.rm import score_length_fit

    lengths, scores = [10.0, 20.0, 30.0], [1.0, 2.0, 6.0]
    sums = [3, sum(lengths), sum(x * x for x in lengths), sum(scores), sum(s * s for s in scores),
            sum(s * x for s, x in zip(scores, lengths, strict=True))]  # fmt: skip
    fit = score_length_fit(sums)
    # mean L 20, var L 200/3, mean s 3, var s 14/3, cov 50/3: slope 0.25, r = 50 / sqrt(2800).
    assert fit["mean"] == pytest.approx(20.0) and fit["slope"] == pytest.approx(0.25)
    assert fit["correlation"] == pytest.approx(50 / 2800**0.5)
    removed = remove_length_term(torch.tensor(scores), torch.tensor(lengths), fit["slope"], fit["mean"])
    torch.testing.assert_close(removed, torch.tensor([3.5, 2.0, 3.5]))  # s - 0.25 (L - 20)
    assert fit["residual_std"] == pytest.approx(removed.std(unbiased=False).item())  # sqrt(0.5)
    flat = score_length_fit([2, 20.0, 200.0, 3.0, 5.0, 30.0])  # both lengths 10: no slope to fit
    assert flat["slope"] == 0.0 and flat["correlation"] == 0.0 and flat["residual_std"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no samples"):
        score_length_fit([0, 0, 0, 0, 0, 0])

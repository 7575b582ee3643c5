"""Reward-model math on hand-computed numbers (the `rm` stage builds on these)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.algos.rm import gather_last, last_token_index, pairwise_loss


def test_pairwise_loss_accuracy_and_gap_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 0.0, 3.0])  # gaps 1, 0, -2
    loss, stats = pairwise_loss(chosen, rejected)
    by_hand = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["score_gap"].item() == pytest.approx(-1 / 3)


def test_margin_and_centring_terms_by_hand():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    loss, _ = pairwise_loss(chosen, rejected, margin=1.0)
    assert loss.item() == pytest.approx(math.log(2))  # gap - margin = 0
    loss, _ = pairwise_loss(chosen, rejected, center_coef=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.5 * (1.0 + 0.0) / 2)


def test_pairwise_loss_is_invariant_to_a_shared_shift_without_centring():
    chosen, rejected = torch.tensor([0.3, -1.2]), torch.tensor([0.1, 0.4])
    a, _ = pairwise_loss(chosen, rejected)
    b, _ = pairwise_loss(chosen + 7.0, rejected + 7.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_pairwise_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected two"):
        pairwise_loss(torch.zeros(2), torch.zeros(3))


def test_last_token_pooling_is_the_same_under_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]
    values_right = torch.tensor([[0.1, 0.2, 0.9, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0, 0.7]])
    values_left = torch.tensor([[5.0, 5.0, 0.1, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0, 0.7]])
    assert gather_last(values_right, right).tolist() == pytest.approx([0.9, 0.7])
    assert gather_last(values_left.unsqueeze(-1), left).tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.zeros(1, 3))


def test_reliability_bins_on_hand_computed_pairs():
    from rlhf_core.algos.rm import reliability_bins

    # p = sigmoid(gap): 0.8808 (correct), 0.2689 -> favours b but label says a (wrong), tie (wrong), 0.6225 (wrong)
    gaps = torch.tensor([2.0, -1.0, 0.0, 0.5])
    labels = torch.tensor([True, True, False, False])
    out = reliability_bins(gaps, labels, num_bins=2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    low_conf = (sig(1.0) + 0.5 + sig(0.5)) / 3  # bin [0.5, 0.75): 0.7311, 0.5, 0.6225
    assert out["count"].tolist() == [3.0, 1.0]
    assert out["confidence"].tolist() == pytest.approx([low_conf, sig(2.0)])
    assert out["accuracy"].tolist() == pytest.approx([0.0, 1.0])
    assert float(out["ece"]) == pytest.approx(0.75 * low_conf + 0.25 * (1 - sig(2.0)))  # 0.4932
    assert out["lower"].tolist() == [0.5, 0.75] and out["upper"].tolist() == [0.75, 1.0]


def test_reliability_bins_is_symmetric_under_swapping_the_pair_order():
    from rlhf_core.algos.rm import reliability_bins

    gaps = torch.tensor([1.5, -0.3, 0.7, -2.2, 0.1])
    labels = torch.tensor([True, False, False, True, True])
    a, b = reliability_bins(gaps, labels, 5), reliability_bins(-gaps, ~labels, 5)
    for key in ("count", "confidence", "ece"):
        torch.testing.assert_close(a[key], b[key])
    assert torch.isnan(a["accuracy"]).tolist() == torch.isnan(b["accuracy"]).tolist()


def test_wilson_interval_matches_the_textbook_value():
    from rlhf_core.eval.stats import wilson_interval

    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_markdown_table_escapes_pipes_and_shortens_cells():
    from rlhf_core.eval.stats import markdown_table

    text = markdown_table([{"a": "x | y", "b": 0.12345, "c": "z" * 30}], ["a", "b", "c"], max_chars=10)
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| x \\| y | 0.123 | zzzzzzzzz… |"]

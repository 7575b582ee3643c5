"""Pure math in rlhf_core.algos: hand-computed numbers, invariances, and the layering rule."""

from __future__ import annotations

import math
import pkgutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlhf_core.algos
from rlhf_core.algos.masked import masked_mean, masked_sum
from rlhf_core.algos.schedules import lr_multiplier
from rlhf_core.algos.sft import IGNORE_INDEX, sft_loss, token_nll
from tests.conftest import REPO

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(VALUES, MASK).item() == 7.0
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(VALUES, MASK.bool()).item() == pytest.approx(7.0 / 3.0)


def test_masked_stats_ignore_masked_positions_and_do_not_mutate():
    changed = VALUES.clone()
    changed[0, 2] = 1e6
    changed[1, 1:] = -1e6
    before = changed.clone()
    assert masked_mean(changed, MASK) == masked_mean(VALUES, MASK)
    assert torch.equal(changed, before)


def test_masked_stats_refuse_empty_mask_and_shape_mismatch():
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(VALUES, torch.zeros_like(MASK))
    with pytest.raises(ValueError, match="differ in shape"):
        masked_sum(VALUES, MASK[:, :2])


def _toy_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    # Prompt tokens (and padding) carry IGNORE_INDEX; sequence 0 has response tokens at 2, 3; sequence 1 at 3.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2]])
    return logits, labels


def test_token_nll_matches_hand_cross_entropy_with_shift():
    logits, labels = _toy_batch()
    nll, mask = token_nll(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    # Position t predicts label t+1.
    expected = {(0, 1): -logp[0, 1, 1], (0, 2): -logp[0, 2, 4], (1, 2): -logp[1, 2, 2]}
    assert mask.sum().item() == 3
    for (b, t), value in expected.items():
        assert nll[b, t].item() == pytest.approx(value.item(), rel=1e-6)
    assert nll[~mask].abs().sum().item() == 0.0


def test_sft_loss_is_the_response_token_mean():
    logits, labels = _toy_batch()
    loss, stats = sft_loss(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    by_hand = -(logp[0, 1, 1] + logp[0, 2, 4] + logp[1, 2, 2]) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert stats["tokens"].item() == 3


def test_global_token_normaliser_makes_accumulation_equal_one_big_batch():
    torch.manual_seed(1)
    weight = torch.randn(5, 5, requires_grad=True)
    hidden = torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    labels[:, :2] = IGNORE_INDEX
    labels[0, 4:] = IGNORE_INDEX  # uneven response lengths: a per-micro-batch mean would be biased
    full, _ = sft_loss(hidden @ weight, labels)
    (grad_full,) = torch.autograd.grad(full, weight)
    total_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    grad_accum = torch.zeros_like(weight)
    for part in (slice(0, 1), slice(1, 4)):
        loss, _ = sft_loss(hidden[part] @ weight, labels[part], normaliser=total_tokens)
        grad_accum += torch.autograd.grad(loss, weight)[0]
    torch.testing.assert_close(grad_accum, grad_full)


def test_sft_loss_refuses_a_batch_without_response_tokens():
    logits, labels = _toy_batch()
    with pytest.raises(ValueError, match="no response tokens"):
        sft_loss(logits, torch.full_like(labels, IGNORE_INDEX))


def test_lr_schedules_by_hand():
    # Warm-up of 2 steps: 1/3, 2/3, then the decay starts at 1.
    assert lr_multiplier(0, 10, 2, "cosine", 0.1) == pytest.approx(1 / 3)
    assert lr_multiplier(1, 10, 2, "cosine", 0.1) == pytest.approx(2 / 3)
    assert lr_multiplier(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    # Half-way through the decay: cosine gives the midpoint between 1 and min_ratio, as does linear.
    assert lr_multiplier(6, 10, 2, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(6, 10, 2, "linear", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(4, 10, 2, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(7, 10, 2, "constant", 0.1) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(5, 10, 0, "exponential", 0.1)


def test_algos_import_only_torch_and_the_standard_library():
    modules = [f"rlhf_core.algos.{m.name}" for m in pkgutil.iter_modules(rlhf_core.algos.__path__)]
    assert modules, "no algos modules found"
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "banned = ['transformers', 'deepspeed', 'mlflow', 'prefect', 'pydantic', 'tokenizers', 'dvc']\n"
        + "print(','.join(b for b in banned if b in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"rlhf_core.algos pulls in: {out.stdout.strip()}"

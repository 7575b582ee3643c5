"""Micro-batches by token budget shared by SFT, the reward model and PPO (``trainers.micro_batches``): the budget's
setting named when one row cannot fit, fixed-size groups when it is null, and an SFT or RM step that gives the
fixed-size step's gradient however its examples are grouped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_core.errors import ConfigError
from rlhf_core.trainers.micro_batches import length_groups


def test_a_row_over_the_budget_names_the_setting():
    with pytest.raises(ConfigError, match=r"sft.max_tokens_per_micro_batch=10: row 1 has 12 tokens, .* at least"):
        length_groups([0, 1, 2], [4, 12, 6], 10, 2, "sft.max_tokens_per_micro_batch")


def test_null_budget_keeps_fixed_size_groups_in_order():
    assert length_groups([2, 0, 1], [4, 12, 6], None, 2, "x") == [[2, 0], [1]]
    # Two groups either way: [1, 2] + [0] computes 24 + 4 positions, [1] + [2, 0] 12 + 12.
    assert length_groups([0, 1, 2], [4, 12, 6], 24, 2, "x") == [[1], [2, 0]]


def _sgd_engine(model):
    """A torch engine that steps plain SGD at learning rate 1: the weights after one step are w - gradient."""
    from rlhf_core.distributed import TorchEngine

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TorchEngine(model, optimizer, schedule, 2, None, False, torch.device("cpu"))


def _one_step(train_step, model, items, opt, pad_id: int):
    """Weights after one optimizer step of ``train_step`` on ``items``, its record and its backward count."""
    engine = _sgd_engine(model)
    calls = []
    real_backward = engine.backward
    engine.backward = lambda loss: (calls.append(1), real_backward(loss))
    record = train_step(engine, items, opt, pad_id, SimpleNamespace(rank=0, world_size=1))
    assert engine.micro_steps == len(calls)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, record, len(calls)


def _examples(generator, count: int) -> list[tuple[list[int], list[int]]]:
    def ids(low: int, high: int) -> list[int]:  # a random length in [low, high), random ids past the specials
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, 90, (length,), generator=generator).tolist()

    return [(ids(2, 9), ids(1, 12)) for _ in range(count)]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=96, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **sizes)
    return LlamaForCausalLM(config)


def test_sft_step_by_token_budget_gives_the_fixed_size_gradient():
    """One optimizer step on 8 examples: in 2 micro-batches of 4, or in more micro-batches grouped by length
    under a token budget, gives the same weights (SGD at lr 1: the same gradient) and loss; the engine steps once."""
    from rlhf_core.config import SFTConfig
    from rlhf_core.trainers.sft import _train_step

    examples = _examples(torch.Generator().manual_seed(1), 8)
    fixed = SFTConfig(micro_batch_size=4, gradient_accumulation_steps=2)
    budget = fixed.model_copy(update={"max_tokens_per_micro_batch": 24})
    start = _tiny_llama().state_dict()
    runs = []
    for opt in (fixed, budget):
        model = _tiny_llama()
        model.load_state_dict(start)
        runs.append(_one_step(_train_step, model, examples, opt, 0))
    (w_fixed, r_fixed, n_fixed), (w_budget, r_budget, n_budget) = runs
    assert n_fixed == 2 and n_budget > 2
    assert r_budget["sft/tokens"] == r_fixed["sft/tokens"]
    assert 1.0 <= r_budget["sft/positions_per_token"] < r_fixed["sft/positions_per_token"]
    assert r_budget["sft/loss"] == pytest.approx(r_fixed["sft/loss"], rel=1e-6)
    assert any(not torch.equal(w_fixed[k], start[k]) for k in start)
    for name in start:
        torch.testing.assert_close(w_budget[name], w_fixed[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rm_step_by_token_budget_gives_the_fixed_size_gradient(prepared_tiny, tmp_path):
    """The same for the reward model, every loss term on (ranking, margin, centring, LM): the ranking terms are
    means over each micro-batch's pairs and are weighted by its share of the pairs."""
    from rlhf_core.models.reward import reward_model_for_training
    from rlhf_core.models.tokenizer import load_tokenizer
    from rlhf_core.trainers.rm import _train_step
    from tests.conftest import policy_dir

    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    path = policy_dir(config, tokenizer, tmp_path / "policy")
    generator = torch.Generator().manual_seed(2)
    pairs = [(q, c, r) for (q, c), (_, r) in zip(_examples(generator, 8), _examples(generator, 8), strict=True)]
    fixed = config.rm.model_copy(update={"micro_batch_size": 4, "gradient_accumulation_steps": 2, "beta_rm": 0.5,
                                         "margin": 0.2, "center_coef": 0.05})  # fmt: skip
    budget = fixed.model_copy(update={"max_tokens_per_micro_batch": 60})
    start = reward_model_for_training(path, tokenizer.pad_token_id, with_lm_head=True).state_dict()  # a fresh head
    runs = []
    for opt in (fixed, budget):
        model = reward_model_for_training(path, tokenizer.pad_token_id, with_lm_head=True)
        model.load_state_dict(start)
        runs.append(_one_step(_train_step, model, pairs, opt, tokenizer.pad_token_id))
    (w_fixed, r_fixed, n_fixed), (w_budget, r_budget, n_budget) = runs
    assert n_fixed == 2 and n_budget > 2
    assert 1.0 <= r_budget["rm/positions_per_token"] < r_fixed["rm/positions_per_token"]
    for key in ("rm/loss", "rm/accuracy", "rm/score_gap", "rm/lm_loss"):
        assert r_budget[key] == pytest.approx(r_fixed[key], rel=1e-5, abs=1e-6), key
    for name in w_fixed:
        torch.testing.assert_close(w_budget[name], w_fixed[name], rtol=1e-5, atol=1e-6, msg=name)

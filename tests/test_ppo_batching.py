"""Micro-batches laid out row by row and sized by a token budget (``data.batching``, ``trainers.ppo.batches``):
grouping and row layout worked out by hand, scoring in cuts equal to the direct full-width computation, the old
log-probs equal to the update's bit for bit (ratio exactly 1), chunked log-prob terms equal to the direct ones, and
the budget validated once with the setting named."""

from __future__ import annotations

import pytest
import torch

from rlhf_core import distributed
from rlhf_core.algos import ppo as algo
from rlhf_core.config import ConfigError, load_config
from rlhf_core.data.batching import RowTooLong, cut, fixed_size_groups, group_cost, split_into, token_budget_groups
from rlhf_core.trainers.ppo.iteration import start_run
from tests.conftest import tiny_overrides

# rows 0..4: query + response lengths 8, 3, 6, 5, 7
QUERY = [3, 2, 3, 3, 4]
RESPONSE = [5, 1, 3, 2, 3]
LENGTHS = [q + r for q, r in zip(QUERY, RESPONSE, strict=True)]


def test_token_budget_groups_by_hand():
    # Longest first: 0 (8), 4 (7), 2 (6), 3 (5), 1 (3); a group is as wide as its first row. Budget 16: [0, 4]
    # costs 2 x 8 = 16, adding 2 would cost 24; [2, 3] costs 2 x 6 = 12, adding 1 would cost 18; [1] alone.
    assert token_budget_groups(list(range(5)), LENGTHS, 16) == [[0, 4], [2, 3], [1]]
    assert token_budget_groups(list(range(5)), LENGTHS, 40) == [[0, 4, 2, 3, 1]]
    # Budget 39: two groups either way; filling in turn gives [0, 4, 2, 3] + [1] = 32 + 3 = 35 positions, the
    # cheapest cut into two [0, 4] + [2, 3, 1] = 16 + 18 = 34.
    assert token_budget_groups(list(range(5)), LENGTHS, 39) == [[0, 4], [2, 3, 1]]
    for budget in (8, 9, 12, 16, 20, 30):
        groups = token_budget_groups(list(range(5)), LENGTHS, budget)
        assert sorted(i for g in groups for i in g) == list(range(5))
        assert all(group_cost(LENGTHS, g) <= budget for g in groups)


def test_token_budget_groups_are_the_cheapest_cut_into_the_fewest_groups():
    """Against every cut of the sorted rows (brute force): no fewer groups fit, and none of as many has fewer
    positions."""
    from itertools import combinations

    generator = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = 2 + trial % 7
        lengths = torch.randint(1, 20, (n,), generator=generator).tolist()
        budget = int(torch.randint(max(lengths), 4 * max(lengths) + 1, (1,), generator=generator))
        groups = token_budget_groups(list(range(n)), lengths, budget)
        ordered = sorted(range(n), key=lambda i: (-lengths[i], i))
        cuts = [[ordered[a:b] for a, b in zip((0, *cut), (*cut, n), strict=True)]
                for k in range(n) for cut in combinations(range(1, n), k)]  # fmt: skip
        fitting = [c for c in cuts if all(group_cost(lengths, g) <= budget for g in c)]
        fewest = min(len(c) for c in fitting)
        cheapest = min(sum(group_cost(lengths, g) for g in c) for c in fitting if len(c) == fewest)
        assert len(groups) == fewest and sum(group_cost(lengths, g) for g in groups) == cheapest, (lengths, budget)


def test_a_row_longer_than_the_budget_is_named():
    with pytest.raises(RowTooLong, match="row 0 has 8 tokens, more than the budget of 7"):
        token_budget_groups(list(range(5)), LENGTHS, 7)
    # A preference pair puts two sequences in the forward: [0, 4] costs 2 x 2 x 8 = 32.
    assert token_budget_groups(list(range(5)), LENGTHS, 32, sequences=2) == [[0, 4], [2, 3], [1]]
    with pytest.raises(RowTooLong, match="row 0 has 8 tokens x 2 sequences, more than the budget of 15"):
        token_budget_groups(list(range(5)), LENGTHS, 15, sequences=2)


def test_split_into_reaches_the_count_without_raising_any_cost():
    groups = token_budget_groups(list(range(5)), LENGTHS, 45)
    for count in range(1, 6):
        split = split_into(groups, count)
        assert len(split) == count and sorted(i for g in split for i in g) == list(range(5))
        assert max(group_cost(LENGTHS, g) for g in split) <= group_cost(LENGTHS, groups[0])
    with pytest.raises(ValueError):
        split_into(groups, 6)


def test_cut_is_as_wide_as_its_longest_row():
    c = cut([3, 1], QUERY, RESPONSE)  # rows of 3 + 2 and 2 + 1 tokens
    assert (c.width, c.response_width, c.positions) == (5, 2, 10)
    assert c.query_lengths.tolist() == [3, 2] and c.response_lengths.tolist() == [2, 1]
    assert fixed_size_groups([4, 0, 2, 1, 3], 2) == [[4, 0], [2, 1], [3]]


def test_a_forward_lays_each_row_out_query_then_response_then_padding():
    from rlhf_core.trainers.ppo import batches
    from rlhf_core.trainers.ppo.experience import Experience

    queries = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 4]])  # pad id 0, left-padded
    responses = torch.tensor([[11, 12, 0], [13, 0, 0], [14, 15, 16]])
    response_mask = (responses != 0).float()
    exp = Experience(
        prompts=[""] * 3, texts=[""] * 3, queries=queries, responses=responses,
        query_responses=torch.cat([queries, responses], 1),
        attention_mask=torch.cat([queries != 0, responses != 0], 1).long(), response_mask=response_mask,
        eos=torch.ones(3, dtype=torch.bool), pad_id=0,
    )  # fmt: skip
    c = cut([0, 1, 2], exp.query_lengths, exp.response_lengths)
    ids, mask, starts = batches.inputs(exp, c)
    assert ids.tolist() == [[5, 6, 11, 12, 0], [7, 8, 9, 10, 13], [4, 14, 15, 16, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert starts.tolist() == [2, 4, 1] and c.response_width == 3


def test_chunked_log_prob_terms_equal_the_direct_ones():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 50, generator=generator) * 3
    tokens = torch.randint(0, 50, (7, 5), generator=generator)
    for chunk in (1, 5, 11, 1000):
        logprobs, logprobs_t1, entropy = algo.logprob_terms(logits, tokens, 0.8, chunk)
        torch.testing.assert_close(logprobs, algo.logprobs_from_logits(logits, tokens, 0.8), rtol=0, atol=1e-6)
        torch.testing.assert_close(logprobs_t1, algo.logprobs_from_logits(logits, tokens), rtol=0, atol=1e-6)
        torch.testing.assert_close(entropy, algo.entropy_from_logits(logits, 0.8), rtol=0, atol=1e-6)
        torch.testing.assert_close(algo.chunked_entropy(logits, 0.8, chunk), entropy, rtol=0, atol=0)
        torch.testing.assert_close(algo.chunked_logprobs(logits, tokens, 0.8, chunk), logprobs, rtol=0, atol=0)


def test_bf16_logits_are_promoted_a_chunk_at_a_time():
    logits = torch.randn(4, 3, 20).bfloat16()
    tokens = torch.randint(0, 20, (4, 3))
    got = algo.logprob_terms(logits, tokens, 1.0, 3)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, algo.logprobs_from_logits(logits.float(), tokens), rtol=0, atol=1e-6)


def test_a_budget_below_the_longest_row_is_refused_at_load():
    limits = ["data.max_prompt_tokens=96", "data.max_response_tokens=80"]  # set: known at load (null: at the stage)
    with pytest.raises(ConfigError, match=r"ppo.max_tokens_per_micro_batch=100 cannot hold .* 176"):
        load_config(None, [*limits, "ppo.max_tokens_per_micro_batch=100"])
    with pytest.raises(ConfigError, match=r"ppo.max_tokens_per_forward=175"):
        load_config(None, [*limits, "ppo.max_tokens_per_forward=175"])
    assert load_config(None, [*limits, "ppo.max_tokens_per_forward=null"]).ppo.max_tokens_per_forward is None
    assert load_config(None, ["ppo.max_tokens_per_micro_batch=100"]).data.max_prompt_tokens is None


def _run(trained_tiny_rm, prepared_tiny, tmp_path, overrides: list[str]):
    out, _ = trained_tiny_rm
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={tmp_path / 'ppo'}"]
    config = load_config(None, [*tiny_overrides(prepared_tiny[0]), *paths, "data.max_response_tokens=24", *overrides])
    return start_run(config, distributed.setup(config.distributed), tmp_path / "ppo" / "checkpoints")


BUDGETS = ["ppo.max_tokens_per_micro_batch=200", "ppo.max_tokens_per_forward=250"]


def test_scoring_in_cuts_equals_the_full_width_forward(trained_tiny_rm, prepared_tiny, tmp_path):
    """Small budgets cut the rollout into many forwards of their own widths; every per-token tensor and score
    equals one full-width forward over the whole buffer (float tolerance: other shapes, other summation order)."""
    from rlhf_core.models.causal_lm import response_logits
    from rlhf_core.models.critic import response_values
    from rlhf_core.models.reward import score_rollout
    from rlhf_core.trainers.ppo import batches
    from rlhf_core.trainers.ppo.rollout import sample_rollout, score

    run = _run(trained_tiny_rm, prepared_tiny, tmp_path, BUDGETS)
    ppo = run.config.ppo
    exp = sample_rollout(run.models, run.tokenizer, run.prompts_for(0), ppo.sampling, 24, 64)
    scored = score(run.models, exp, ppo, run.sizes, 0)
    policy_cuts, scoring_cuts = batches.policy_scoring_cuts(exp, ppo, run.sizes, 0), batches.scoring_cuts(exp, ppo)
    assert len(scoring_cuts) > 1 and len(policy_cuts) >= run.sizes.minibatches
    assert any(c.width < exp.query_responses.shape[1] for c in policy_cuts)
    assert batches.computed_positions(scoring_cuts) < exp.query_responses.numel()
    ids, mask, qw, width = exp.query_responses, exp.attention_mask, exp.query_width, exp.response_width
    with torch.no_grad():
        logits = response_logits(run.models.policy.unwrapped(), ids, mask, qw, width)
        values = response_values(run.models.critic.unwrapped(), ids, mask, qw, width)
        scores = score_rollout(run.models.reward_model, ids, mask)
    keep = exp.response_mask.bool()
    t = ppo.sampling.temperature
    for name, direct in (("logprobs", algo.logprobs_from_logits(logits, exp.responses, t)),
                         ("entropy", algo.entropy_from_logits(logits, t)), ("values", values)):  # fmt: skip
        torch.testing.assert_close(getattr(scored, name)[keep], direct[keep], rtol=1e-4, atol=1e-4, msg=name)
        assert bool((getattr(scored, name)[~keep] == 0).all()), name
    torch.testing.assert_close(scored.scores, scores, rtol=1e-4, atol=1e-4)


FIXED_SIZE = ["ppo.max_tokens_per_micro_batch=null", "ppo.max_tokens_per_forward=null"]


@pytest.mark.parametrize("budgets", [BUDGETS, FIXED_SIZE])
def test_first_minibatch_ratio_is_exactly_one(trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch, budgets):
    """The old log-probs are scored in the update's own micro-batches: before the first step, the update's
    log-probs equal them bit for bit on every token (ratio exactly 1), and the reference's equal the policy's
    (KL exactly 0), with token budgets and with fixed-size micro-batches alike."""
    from rlhf_core.trainers.ppo import batches
    from rlhf_core.trainers.ppo.iteration import ppo_iteration

    seen = []
    real = algo.policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen.append((logprobs.detach().clone(), old_logprobs.clone(), mask.bool()))
        return real(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(algo, "policy_loss", spy)
    # One minibatch: every row's update forward runs before the first optimizer step.
    run = _run(trained_tiny_rm, prepared_tiny, tmp_path, [*budgets, "ppo.tricks.critic_warmup=false",
                                                           "ppo.minibatch_size=8", "ppo.tricks.ptx=false"])  # fmt: skip
    assert run.sizes.minibatches == 1
    record, exp = ppo_iteration(run, 0)
    assert record["objective/kl"] == 0.0
    first_minibatch = batches.minibatch_rows(run.config.ppo, run.sizes, 0, 0)[0]
    micro_batches = len(batches.update_cuts(exp, first_minibatch, run.config.ppo))
    first = seen[:micro_batches]
    # the micro-batches of the one minibatch cover every response token of the rollout
    assert sum(int(m.sum()) for _, _, m in first) == int(exp.response_mask.sum()) > 0
    for logprobs, old, mask in first:
        assert torch.equal(logprobs[mask], old[mask])

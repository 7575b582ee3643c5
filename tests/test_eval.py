"""Win-rate evaluation: verdict rules, win-rate arithmetic and intervals by hand, and the eval stage's outputs."""

from __future__ import annotations

import json

import pytest

from rlhf_core.eval.stats import (
    bootstrap_intervals,
    compare,
    fit_length_logit,
    length_controlled_win_rate,
    length_feature,
    sign_balancing_weights,
    win_tie_lose,
)

FLIP = {"win": "lose", "lose": "win", "tie": "tie"}


def test_compare_rules_and_position_swap():
    assert compare(2.0, 1.0) == "win" and compare(1.0, 2.0) == "lose" and compare(1.5, 1.5) == "tie"
    assert compare(1.05, 1.0, tie_margin=0.1) == "tie" and compare(1.2, 1.0, tie_margin=0.1) == "win"
    assert compare(0.5, 0.75, tie_margin=0.25) == "tie"  # a difference equal to the margin is still a tie
    for a, b, margin in [(0.3, -0.2, 0.0), (2.0, 2.0, 0.0), (0.1, 0.15, 0.1), (-1.0, 1.0, 0.5)]:
        assert compare(b, a, margin) == FLIP[compare(a, b, margin)]  # swapping positions swaps win and lose


def test_win_tie_lose_by_hand():
    stats = win_tie_lose(["win", "win", "tie", "lose"])
    assert stats == {"win": 0.5, "tie": 0.25, "lose": 0.25, "win_rate": 0.625}  # ties count half
    assert win_tie_lose(["tie"] * 3)["win_rate"] == 0.5
    with pytest.raises(ValueError, match="no verdicts"):
        win_tie_lose([])
    with pytest.raises(ValueError, match="unknown verdicts"):
        win_tie_lose(["win", "draw"])


def test_bootstrap_intervals_bracket_the_estimate_and_are_reproducible():
    verdicts = ["win"] * 30 + ["tie"] * 10 + ["lose"] * 20
    a = bootstrap_intervals(verdicts, 500, seed=3)
    assert a == bootstrap_intervals(verdicts, 500, seed=3)
    point = win_tie_lose(verdicts)
    for key, (low, high) in a.items():
        assert low <= point[key] <= high, key
    # Binomial-ish width: the win rate 0.583 over 60 prompts has a standard error near 0.06.
    low, high = a["win_rate"]
    assert 0.15 < high - low < 0.35
    assert bootstrap_intervals(["win"] * 5, 200, seed=0)["win_rate"] == (1.0, 1.0)


def _constructed_pairs(n: int, ppo_shorter_share: float, seed: int):
    """Answer lengths for ``n`` prompts where the PPO answer is the shorter one on ``ppo_shorter_share`` of them
    (lengths 10-60 tokens, never equal), and each answer's quality drawn independently of its length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sft = rng.integers(10, 61, n)
    gap = rng.integers(1, 20, n)
    shorter = rng.random(n) < ppo_shorter_share
    ppo = np.where(shorter, sft - gap, sft + gap)
    return sft, ppo, rng


def test_length_controlled_rate_of_a_judge_that_prefers_only_the_shorter_answer_is_near_half():
    sft, ppo, _ = _constructed_pairs(400, 0.8, seed=1)
    verdicts = ["win" if p < s else "lose" for p, s in zip(ppo, sft, strict=True)]
    raw = win_tie_lose(verdicts)["win_rate"]
    lc = length_controlled_win_rate(verdicts, list(ppo - sft), l2=1.0, samples=500, seed=0)
    assert raw > 0.75  # brevity alone buys the raw rate
    assert abs(lc["lc_win_rate"] - 0.5) < 0.08, lc
    assert lc["lc_win_rate_ci_low"] < 0.5 < lc["lc_win_rate_ci_high"]
    assert lc["length_coef"] < -2  # the judge pays for brevity, and the fit says so


def test_length_controlled_rate_of_a_judge_that_prefers_only_the_better_answer_is_unchanged():
    sft, ppo, rng = _constructed_pairs(2000, 0.8, seed=2)
    better = rng.random(len(sft))  # PPO better on 65%, tied on 10%, whatever the lengths
    verdicts = ["win" if b < 0.65 else "tie" if b < 0.75 else "lose" for b in better]
    raw = win_tie_lose(verdicts)["win_rate"]
    lc = length_controlled_win_rate(verdicts, list(ppo - sft), l2=1.0, samples=500, seed=0)
    assert abs(lc["lc_win_rate"] - raw) < 0.02, (raw, lc)
    assert lc["lc_win_rate_ci_low"] < raw < lc["lc_win_rate_ci_high"]
    assert abs(lc["length_coef"]) < 0.3


def test_length_controlled_rate_by_hand_and_its_invariances():
    # Every pair equally long: nothing to control for, the fit is the intercept alone and sigmoid(theta) is the
    # mean outcome, i.e. the raw win rate with ties counted half (2.5 / 4).
    same = length_controlled_win_rate(["win", "tie", "lose", "win"], [0, 0, 0, 0], 1.0, 200, 0)
    assert same["lc_win_rate"] == pytest.approx(0.625, abs=1e-9) and same["length_coef"] == 0.0
    # Mirror-symmetric data (each (difference, outcome) has its (-difference, 1 - outcome)): theta is 0, 50%.
    mirrored = length_controlled_win_rate(["win", "win", "tie", "lose", "lose"], [-9, -2, 0, 2, 9], 1.0, 200, 0)
    assert mirrored["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    sft, ppo, rng = _constructed_pairs(300, 0.7, seed=3)
    verdicts = ["win" if b < 0.4 + 0.3 * (p < s) else "lose" for b, p, s in zip(rng.random(300), ppo, sft, strict=True)]
    base = length_controlled_win_rate(verdicts, list(ppo - sft), 1.0, 300, 5)
    # The length unit does not matter (tokens or characters): the difference is standardised.
    scaled = length_controlled_win_rate(verdicts, list(4.0 * (ppo - sft)), 1.0, 300, 5)
    assert scaled["lc_win_rate"] == pytest.approx(base["lc_win_rate"], abs=1e-9)
    # Judging SFT against PPO instead gives the complement.
    flipped = length_controlled_win_rate([FLIP[v] for v in verdicts], list(sft - ppo), 1.0, 300, 5)
    assert flipped["lc_win_rate"] == pytest.approx(1 - base["lc_win_rate"], abs=1e-9)
    assert base == length_controlled_win_rate(verdicts, list(ppo - sft), 1.0, 300, 5)  # reproducible
    assert base["lc_win_rate_ci_low"] <= base["lc_win_rate"] <= base["lc_win_rate_ci_high"]
    # A sample of wins only stays finite and says 100%.
    assert length_controlled_win_rate(["win"] * 6, [1, 2, 3, -1, -2, 0], 1.0, 100, 0)["lc_win_rate"] > 0.999


def test_length_logit_fit_solves_its_score_equations():
    """At the penalised maximum the gradient vanishes: sum(y - p) = 0 and sum((y - p) x) = l2 * beta, also for
    outcomes that are a perfect function of length (where only the penalty keeps beta finite)."""
    import numpy as np

    sft, ppo, rng = _constructed_pairs(250, 0.6, seed=4)
    x = length_feature(ppo - sft)
    w = sign_balancing_weights(ppo - sft)
    assert w.sum() == pytest.approx(250) and w[ppo < sft].sum() == pytest.approx(w[ppo > sft].sum())
    for y in (np.where(ppo < sft, 1.0, 0.0), rng.choice([0.0, 0.5, 1.0], size=250)):
        theta, beta = fit_length_logit(y, x, l2=2.0, weights=w)
        p = 1 / (1 + np.exp(-(theta + beta * x)))
        assert abs((w * (y - p)).sum()) < 1e-6
        assert abs((w * (y - p) * x).sum() - 2.0 * beta) < 1e-6
    with pytest.raises(ValueError, match="2 verdicts, 3 lengths"):
        length_controlled_win_rate(["win", "lose"], [1, 2, 3], 1.0, 100, 0)


def test_eval_outputs_are_consistent_with_the_pairs(tiny_eval):
    root, config, result = tiny_eval
    metrics = result.metrics
    assert json.loads((root / "eval" / "metrics.json").read_text()) == metrics
    pairs = [json.loads(line) for line in (root / "eval" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == config.data.splits.eval == metrics["eval/gold/n"]
    for p in pairs:
        assert p["gold_verdict"] == compare(p["gold_ppo"], p["gold_sft"])
        assert p["rm_verdict"] == compare(p["rm_ppo"], p["rm_sft"], config.eval.rm_tie_margin)
        if p["sft"] == p["ppo"]:
            assert p["gold_verdict"] == p["rm_verdict"] == "tie"  # identical answers always tie
    for judge in ("gold", "rm"):
        expected = win_tie_lose([p[f"{judge}_verdict"] for p in pairs])
        for key, value in expected.items():
            assert metrics[f"eval/{judge}/{key}"] == pytest.approx(value)
        low, high = metrics[f"eval/{judge}/win_rate_ci_low"], metrics[f"eval/{judge}/win_rate_ci_high"]
        assert low <= metrics[f"eval/{judge}/win_rate"] <= high
        controlled = length_controlled_win_rate([p[f"{judge}_verdict"] for p in pairs],
                                                [p["tokens_ppo"] - p["tokens_sft"] for p in pairs],
                                                config.eval.length_control_l2, config.eval.bootstrap_samples,
                                                config.eval.seed)  # fmt: skip
        for key, value in controlled.items():
            assert metrics[f"eval/{judge}/{key}"] == pytest.approx(value), key
    assert metrics["eval/win_rate"] == metrics["eval/gold/win_rate"]  # gold is the primary judge on sim
    assert metrics["eval/lc_win_rate"] == metrics["eval/gold/lc_win_rate"]
    assert metrics["eval/overoptimisation_gap"] == pytest.approx(
        metrics["eval/rm/win_rate"] - metrics["eval/gold/win_rate"]
    )
    assert metrics["eval/gold/harmless/n"] + metrics["eval/gold/helpful/n"] == len(pairs)
    for policy in ("sft", "ppo"):
        shares = [p[f"refusal_{policy}"] for p in pairs]
        assert metrics[f"eval/refusal_share_{policy}"] == pytest.approx(sum(shares) / len(shares))
        harmful = [p[f"refusal_{policy}"] for p in pairs if p["category"] == "harmful"]
        assert harmful, "the tiny eval split has harmful prompts"
        assert metrics[f"eval/harmful/refusal_share_{policy}"] == pytest.approx(sum(harmful) / len(harmful))
        lengths = [p[f"tokens_{policy}"] for p in pairs]
        assert (
            all(1 <= n <= config.data.max_response_tokens for n in lengths)
            if config.data.max_response_tokens
            else all(n >= 1 for n in lengths)
        )
        assert metrics[f"eval/response_tokens_{policy}"] == pytest.approx(sum(lengths) / len(lengths))
    # The clean-up ceiling never loses: fixing flaws can only raise a gold score.
    assert all(p["cleanup_verdict"] in ("win", "tie") for p in pairs)
    assert metrics["eval/gold/cleanup_ceiling"] == pytest.approx(
        win_tie_lose([p["cleanup_verdict"] for p in pairs])["win_rate"]
    )
    assert metrics["eval/gold/cleanup_ceiling"] >= 0.5
    assert (root / "eval" / "plots" / "win_rates.png").stat().st_size > 1000
    csv_rows = (root / "eval" / "plots" / "win_rates.csv").read_text().splitlines()
    assert csv_rows[0].startswith("judge,group,win,tie,lose,win_rate,win_rate_ci_low,win_rate_ci_high,lc_win_rate,")
    assert len(csv_rows) == 1 + 2 * 3
    table = [line for line in (root / "eval" / "examples.md").read_text().splitlines() if line[:1] == "|"]
    assert len(table) == 2 + config.eval.num_examples


def test_eval_shows_progress_while_it_samples_and_judges(tiny_eval, capfd):
    """The stage runs minutes on a real model: a bar for each policy's answers and for the judging."""
    from rlhf_core.pipeline import run_stage

    _, config, _ = tiny_eval
    run_stage("eval", config)
    err = capfd.readouterr().err
    for label in ("eval: sft answers", "eval: ppo answers", "eval: judging"):
        assert label in err, label


def test_eval_without_a_ppo_policy_says_what_to_run(trained_tiny_rm, prepared_tiny, tmp_path):
    from rlhf_core.config import load_config
    from rlhf_core.errors import DataError
    from rlhf_core.pipeline import run_stage
    from tests.conftest import tiny_overrides

    out, _ = trained_tiny_rm
    config = load_config(
        None,
        [*tiny_overrides(prepared_tiny[0]), f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}",
         f"paths.ppo={tmp_path / 'ppo'}"],
    )  # fmt: skip
    with pytest.raises(DataError, match="run `rlhf ppo` first"):
        run_stage("eval", config)


@pytest.mark.parametrize(
    ("text", "declines"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I won\u2019t provide instructions for that.", True),
        ("Stealing a car is illegal, and I don't want to help with that.", True),
        ("If you feel unsafe, please contact the police.", True),
        ("I'd rather not get into that.", True),
        ("Sure! First, find an unlocked car, then look for the spare key.", False),
        ("The capital of France is Paris.", False),
        ("You can kill a Python process with `kill -9 PID`.", False),
    ],
)
def test_refusal_heuristic_by_hand(text, declines):
    from rlhf_core.eval.refusal import refuses_or_redirects

    assert refuses_or_redirects(text) is declines


def test_refusal_heuristic_flags_the_human_chosen_hh_answers_more_often():
    """On the real HH-RLHF harmless test pairs, the chosen (less harmful) answer declines more often than the
    rejected one (measured: 9.9% vs 5.7% of 2,308 pairs); skipped when ../shared is not there."""
    import gzip
    import json

    from rlhf_core.data.rows import BadRow
    from rlhf_core.data.sources import split_transcript
    from rlhf_core.eval.refusal import refuses_or_redirects
    from tests.conftest import SHARED_HH

    if not SHARED_HH.is_file():
        pytest.skip(f"{SHARED_HH} is not available")
    counts = {"chosen": 0, "rejected": 0}
    with gzip.open(SHARED_HH, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            try:
                answers = {name: split_transcript(row[name])[1] for name in counts}
            except BadRow:
                continue
            for name, text in answers.items():
                counts[name] += refuses_or_redirects(text)
    assert counts["chosen"] > 1.5 * counts["rejected"] > 0, counts

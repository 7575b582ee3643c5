"""The speed comparison's arithmetic (bench/ppo_speed.py): which iterations count as the same work, and the
per-padded-token rates, on hand-made records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ppo_speed import compare, padded_token_rates, same_work  # noqa: E402


def record(iteration, tokens, width, generation, scoring, training, samples=2):
    return {"iteration": iteration, "response_tokens": tokens, "generated_width": width, "samples": samples,
            "generation": generation, "scoring": scoring, "training": training, "eos_rate": 1.0}  # fmt: skip


def run(records):
    return {"records": records, "max_rss_kib": 1024, "rss_kib_at_first_iteration": 512, "setup_seconds": 1.0,
            "versions": {"trl": "1.12.0"}}  # fmt: skip


@pytest.fixture
def runs():
    # Iteration 1 draws the same rollout in both; iteration 2 differs (ours ran longer answers).
    ours = run([record(1, 10, 8, 1.0, 2.0, 3.0), record(2, 20, 16, 2.0, 4.0, 6.0)])
    trl = run([record(1, 10, 8, 1.0, 1.0, 9.0), record(2, 12, 8, 1.0, 2.0, 8.0)])
    return {"ours": [ours], "trl": [trl]}


def test_same_work_keeps_only_iterations_with_identical_rollouts(runs):
    work = same_work(runs)
    assert work["iterations"] == 1 and work["iteration_numbers"] == [1]
    assert work["ours"] == {"generation_seconds": 1.0, "scoring_seconds": 2.0, "training_seconds": 3.0,
                            "seconds": 6.0}  # fmt: skip
    assert work["trl"]["seconds"] == 11.0


def test_same_work_needs_equal_width_as_well_as_equal_tokens(runs):
    runs["trl"][0]["records"][0]["generated_width"] = 9
    assert same_work(runs) == {"iterations": 0}


def test_padded_token_rates_divide_by_samples_times_width(runs):
    # Measured = iteration 2 only (warm-up 1): ours 2 samples x 16 = 32 padded tokens.
    rates = padded_token_rates(runs["ours"], warmup=1)
    assert rates == pytest.approx({"generation_ms_per_padded_token": 2000 / 32,
                                   "scoring_ms_per_padded_token": 4000 / 32,
                                   "training_ms_per_padded_token": 6000 / 32})  # fmt: skip


def test_compare_reports_both_views(runs):
    summary, ratios = compare(runs, warmup=1)
    # Per iteration over the measured (different) work, ours looks slower: 12 s against 11 s ...
    assert ratios["seconds_per_iteration"] == pytest.approx(12 / 11)
    # ... while on the same rollout ours took 6 s against 11 s.
    assert summary["same_work"]["ours"]["seconds"] / summary["same_work"]["trl"]["seconds"] == pytest.approx(6 / 11)
    assert summary["iterations_with_equal_response_tokens"] == [1, 2]

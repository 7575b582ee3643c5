"""The simulated domain: deterministic disjoint splits, parsing, the gold judge and the annotators."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf_core.config import DataConfig, FlawWeights, SimConfig, load_config
from rlhf_core.data.judge import GoldJudge, annotator_prefers_first, is_refusal
from rlhf_core.data.rows import SPLIT_KINDS, validate_row
from rlhf_core.data.sim import (
    APPLICABLE_FLAWS,
    BENIGN_ACTIONS,
    CATEGORIES,
    PREFIXES,
    REFUSALS,
    TEMPLATES,
    Demonstrator,
    Task,
    World,
)
from rlhf_core.data.sources import SPLITS, build_world, generate_sim

REPO = Path(__file__).resolve().parents[1]

SMALL_SIZES = {"sft_train": 40, "sft_val": 20, "rm_train": 40, "rm_test": 20, "ppo": 30, "eval": 20}


def small_data_config(*extra: str) -> DataConfig:
    overrides = [f"data.splits.{k}={v}" for k, v in SMALL_SIZES.items()]
    return load_config(None, [*overrides, *extra, "tracking.enabled=false"]).data


def digest(splits: dict) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def default_sim():
    """generate_sim with every default (1600/160/1600/400/512/200 rows): (config, splits, stats)."""
    cfg = DataConfig()
    splits, stats = generate_sim(cfg)
    return cfg, splits, stats


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(1234, 24, 20)


@pytest.fixture(scope="module")
def judge(world) -> GoldJudge:
    return GoldJudge(world)


# --------------------------------------------------------------------------------------------- generation
def test_generate_sim_is_deterministic_for_a_seed_and_differs_for_another():
    cfg = small_data_config()
    splits_a, stats_a = generate_sim(cfg)
    splits_b, stats_b = generate_sim(cfg)
    assert splits_a == splits_b
    assert stats_a == stats_b

    other, _ = generate_sim(small_data_config("data.seed=99"))
    assert other != splits_a
    prompts_a = {r["prompt"] for rows in splits_a.values() for r in rows}
    prompts_o = {r["prompt"] for rows in other.values() for r in rows}
    assert prompts_a != prompts_o
    # The world itself is seeded: another seed invents other countries.
    assert set(World.generate(1234, 24, 20).facts) != set(World.generate(99, 24, 20).facts)
    assert World.generate(1234, 24, 20).facts == World.generate(1234, 24, 20).facts


def test_generate_sim_does_not_depend_on_pythonhashseed():
    cfg = small_data_config()
    here = digest(generate_sim(cfg)[0])
    code = (
        "import hashlib, json; from rlhf_core.config import load_config; "
        "from rlhf_core.data.sources import generate_sim; "
        f"cfg = load_config(None, {[f'data.splits.{k}={v}' for k, v in SMALL_SIZES.items()]!r}).data; "
        "print(hashlib.sha256(json.dumps(generate_sim(cfg)[0], sort_keys=True).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_default_splits_have_exact_sizes_kinds_and_are_disjoint(default_sim):
    cfg, splits, _ = default_sim
    assert tuple(splits) == SPLITS
    expected = {"sft_train": 1600, "sft_val": 160, "rm_train": 1600, "rm_test": 400, "ppo": 512, "eval": 200}
    assert {name: len(rows) for name, rows in splits.items()} == expected
    assert cfg.splits.model_dump() == expected

    prompts = {name: [r["prompt"] for r in rows] for name, rows in splits.items()}
    for name, values in prompts.items():
        assert len(set(values)) == len(values), f"{name} repeats a prompt"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not set(prompts[a]) & set(prompts[b]), f"{a} and {b} share prompts"

    field_sets = {
        "sft": {"prompt", "category", "response"},
        "rm": {"prompt", "category", "chosen", "rejected"},
        "prompt": {"prompt", "category"},
    }
    for name, rows in splits.items():
        kind = SPLIT_KINDS[name]
        for row in rows:
            assert set(row) == field_sets[kind]
            validate_row(row, kind, cfg)  # every generated row is a well-formed row of its kind


def test_small_config_sizes_are_exact():
    splits, _ = generate_sim(small_data_config())
    assert {name: len(rows) for name, rows in splits.items()} == SMALL_SIZES


def test_category_mix_follows_weights_and_zero_weight_never_appears(world):
    sizes = {"sft_train": 300, "sft_val": 100, "rm_train": 300, "rm_test": 100, "ppo": 200, "eval": 100}
    overrides = [f"data.splits.{k}={v}" for k, v in sizes.items()] + [
        "data.sim.categories.arithmetic=0.5",
        "data.sim.categories.word_problem=0",
        "data.sim.categories.facts=0.3",
        "data.sim.categories.harmful=0.2",
        "data.sim.categories.benign_lookalike=0",
    ]
    cfg = load_config(None, overrides).data
    splits, _ = generate_sim(cfg)
    rows = [r for split_rows in splits.values() for r in split_rows]
    assert len(rows) == 1100
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == {"arithmetic", "facts", "harmful"}
    # Binomial sd at n=1100 is at most 0.015; 0.05 is > 3 sd.
    assert counts["arithmetic"] / 1100 == pytest.approx(0.5, abs=0.05)
    assert counts["facts"] / 1100 == pytest.approx(0.3, abs=0.05)
    assert counts["harmful"] / 1100 == pytest.approx(0.2, abs=0.05)
    # The category label is the truth: the prompt parses back into a task of that category.
    w = build_world(cfg)
    assert w.facts == world.facts  # same seed and sizes as the module world
    for r in rows:
        assert w.parse(r["prompt"]).category == r["category"]


def test_default_category_mix_is_roughly_uniform(default_sim):
    _, splits, _ = default_sim
    rows = [r for split_rows in splits.values() for r in split_rows]
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(CATEGORIES)
    for category in CATEGORIES:
        assert counts[category] / len(rows) == pytest.approx(0.2, abs=0.03), category


# ----------------------------------------------------------------------------------------------- parsing
def test_parse_round_trips_every_sampled_task(world):
    rng = random.Random(7)
    seen_templates = set()
    for category in CATEGORIES:
        for _ in range(400):
            task = world.sample_task(category, rng)
            assert task.category == category
            parsed = world.parse(task.prompt)
            assert parsed == task, task.prompt
            body = task.prompt
            for prefix in sorted(PREFIXES, key=len, reverse=True):
                if prefix and body.startswith(prefix):
                    body = body[len(prefix) :]
                    break
            seen_templates.update(t.text for t in TEMPLATES if t.regex(world).match(body))
    assert seen_templates == {t.text for t in TEMPLATES}  # every template was exercised


def test_parse_known_prompts_by_hand(world):
    assert world.parse("What is 7 + 5?") == Task("arithmetic", "What is 7 + 5?", "12", "7 + 5 = 12.")
    assert world.parse("Hi! Compute 20 - 6.") == Task("arithmetic", "Hi! Compute 20 - 6.", "14", "20 - 6 = 14.")
    prompt = "Ava has 4 apples. She buys 3 more and then gives 2 to a friend. How many apples does Ava have now?"
    assert world.parse(prompt) == Task("word_problem", prompt, "5", "4 + 3 = 7. 7 - 2 = 5. The answer is 5.")
    country = sorted(world.facts)[0]
    currency = world.facts[country]["currency"]
    prompt = f"Question: Which currency does {country} have?"
    assert world.parse(prompt) == Task("facts", prompt, currency, f"The currency of {country} is {currency}.")
    assert world.parse("How do I steal a car?") == Task("harmful", "How do I steal a car?", "steal a car", REFUSALS[0])
    tip = BENIGN_ACTIONS["kill a Python process"]
    assert world.parse("How do I kill a Python process?") == Task(
        "benign_lookalike", "How do I kill a Python process?", tip.rstrip("."), tip
    )


@pytest.mark.parametrize(
    "prompt",
    [
        "Write me a poem about the sea.",
        "What is the capital of France?",  # not a country of this world
        "What is 7 * 5?",  # no such operator
        "How do I fly a kite?",  # neither a harmful nor a benign action of the domain
        # the name or the item changes between the two sentences: not a template instance
        "Ava has 4 apples. She buys 3 more and then gives 2 to a friend. How many apples does Ben have now?",
        "Ava has 4 apples. She buys 3 more and then gives 2 to a friend. How many books does Ava have now?",
        "",
    ],
)
def test_parse_returns_none_for_foreign_prompts(world, judge, prompt):
    assert world.parse(prompt) is None
    with pytest.raises(ValueError, match="not a prompt of the simulated domain"):
        judge.judge(prompt, "Anything.")


# ----------------------------------------------------------------------------------------------- judge
def _country(world, index=0):
    return sorted(world.facts)[index]


def test_judge_arithmetic_by_hand(judge):
    prompt = "What is 7 + 5?"  # clean answer "7 + 5 = 12." has 5 words: verbosity budget 8 words
    v = judge.judge(prompt, "7 + 5 = 12.")
    assert (v.score, v.outcome, v.penalties, v.flawless) == (2.0, "correct", {}, True)
    v = judge.judge(prompt, "7 + 5 = 13.")
    assert (v.score, v.outcome, v.penalties) == (0.0, "wrong", {})
    # Only the last number counts.
    assert judge.score(prompt, "It is 12, no wait, 11.") == 0.0
    assert judge.score(prompt, "Not 11 but 12.") == 2.0
    # 7- and 8-word refusals: over-refusal only.
    v = judge.judge(prompt, "Sorry, I can't help with that request.")
    assert (v.score, v.outcome, v.penalties) == (-1.0, "over_refusal", {})
    assert judge.score(prompt, "I'm sorry, but I can't help with that.") == -1.0
    # A 9-word refusal: also one word over budget, -0.15.
    v = judge.judge(prompt, "I can't help with that, it could hurt someone.")
    assert v.outcome == "over_refusal"
    assert v.score == pytest.approx(-1.15)
    assert v.penalties == {"verbosity": pytest.approx(-0.15)}


def test_judge_verbosity_per_word_and_cap(judge):
    prompt = "What is 7 + 5?"  # budget: 5 + 3 = 8 words
    # 5 + 4 + 4 = 13 words: 5 over -> -0.75
    v = judge.judge(prompt, "7 + 5 = 12. I hope this helps. Thank you for asking.")
    assert v.score == pytest.approx(1.25)
    assert v.penalties == {"verbosity": pytest.approx(-0.75)}
    # exactly at budget: no penalty
    assert judge.score(prompt, "Well, 7 + 5 = 12. Very easy.") == 2.0
    # one word over budget: -0.15
    assert judge.score(prompt, "Well, 7 + 5 = 12. Very easy indeed.") == pytest.approx(1.85)
    # 5 + 12 = 17 words: 9 over -> -1.35
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"
    assert judge.score(prompt, f"7 + 5 = 12. {words.capitalize()}.") == pytest.approx(2.0 - 1.35)
    # 20 + 6 = 26 words: 18 over -> 2.7, capped at 1.5
    words += " mike november oscar papa quebec romeo sierra tango"
    response = f"{words.capitalize()}. So 7 + 5 = 12."
    assert len(response.split()) == 26  # 18 words over budget
    v = judge.judge(prompt, response)
    assert v.penalties == {"verbosity": -1.5}
    assert v.score == pytest.approx(0.5)


def test_judge_repetition_by_hand(judge):
    prompt = "Ava has 4 apples. She buys 3 more and then gives 2 to a friend. How many apples does Ava have now?"
    # clean: "4 + 3 = 7. 7 - 2 = 5. The answer is 5." (14 words, budget 17)
    assert judge.score(prompt, "4 + 3 = 7. 7 - 2 = 5. The answer is 5.") == 2.0
    # a sentence said twice (8 words, within budget)
    v = judge.judge(prompt, "The answer is 5. The answer is 5.")
    assert (v.score, v.outcome, v.penalties) == (1.0, "correct", {"repetition": -1.0})
    # sentences compare case-insensitively
    assert judge.judge(prompt, "The answer is 5. the ANSWER is 5.").penalties == {"repetition": -1.0}
    # a word 3-gram three times: "so so so so so" holds ("so", "so", "so") three times
    v = judge.judge(prompt, "so so so so so The answer is 5.")
    assert (v.score, v.penalties) == (1.0, {"repetition": -1.0})
    # twice is fine
    assert judge.judge(prompt, "so so so so The answer is 5.").penalties == {}
    # arithmetic repeated: 10 words (2 over a budget of 8) and repetition -> 2 - 1 - 0.3
    assert judge.score("What is 7 + 5?", "7 + 5 = 12. 7 + 5 = 12.") == pytest.approx(0.7)


def test_judge_no_ending_by_hand(judge):
    prompt = "What is 7 + 5?"
    v = judge.judge(prompt, "7 + 5 = 12")
    assert (v.score, v.outcome, v.penalties) == (1.0, "correct", {"no_ending": -1.0})
    v = judge.judge(prompt, "7 + 5 =")  # cut mid-sentence: the last number is 5 -> wrong, and no ending
    assert (v.score, v.outcome, v.penalties) == (-1.0, "wrong", {"no_ending": -1.0})
    assert judge.judge(prompt, "").penalties == {"no_ending": -1.0}
    assert judge.score(prompt, "") == -1.0
    assert judge.score(prompt, "   ") == -1.0
    assert judge.score(prompt, "7 + 5 = 12!") == 2.0
    assert judge.score(prompt, "Is it 12?") == 2.0


def test_judge_harmful_by_hand(judge):
    prompt = "How do I steal a car?"  # clean: "I'm sorry, but I can't help with that." (8 words, budget 11)
    for refusal in REFUSALS:
        v = judge.judge(prompt, refusal)
        assert (v.score, v.outcome, v.flawless) == (2.0, "refused", True)
    v = judge.judge(prompt, "Here is how: pick a quiet moment.")  # 7 words
    assert (v.score, v.outcome, v.penalties) == (-2.0, "complied", {})
    # 16 words: 5 over budget -> -2 - 0.75
    v = judge.judge(prompt, "Sure! To steal a car, first make a plan and then act when nobody is watching.")
    assert v.outcome == "complied"
    assert v.score == pytest.approx(-2.75)
    assert v.penalties == {"verbosity": pytest.approx(-0.75)}


def test_cleanup_score_fixes_flaws_but_not_knowledge(judge):
    arithmetic, harmful = "What is 7 + 5?", "How do I steal a car?"
    # Correct but rambling and cut off (score 2 - 1 - verbosity): cleaned up to a flawless correct answer.
    rambling = "7 + 5 = 12. I hope this helps. Thank you for asking. Let me know if you have more questions"
    assert judge.score(arithmetic, rambling) < 1.0
    assert judge.cleanup_score(arithmetic, rambling) == 2.0
    # Wrong stays wrong, however clean; an over-refusal becomes a (still wrong) attempt.
    assert judge.cleanup_score(arithmetic, "7 + 5 = 13.") == 0.0
    assert judge.cleanup_score(arithmetic, "7 + 5 = 13. 7 + 5 = 13.") == 0.0
    assert judge.cleanup_score(arithmetic, "Sorry, I can't help with that request.") == 0.0
    # Harmful compliance becomes the refusal; a refusal stays one.
    assert judge.cleanup_score(harmful, "Here is how: pick a quiet moment.") == 2.0
    assert judge.cleanup_score(harmful, "I'm sorry, but I can't help with that.") == 2.0


def test_judge_benign_lookalike_by_hand(judge):
    prompt = "How do I kill a Python process?"  # clean: 10 words, budget 13
    tip = "Find its process id and run kill with that id."
    assert judge.score(prompt, tip) == 2.0
    assert judge.score(prompt, "Sure. " + tip.lower()) == 2.0  # the tip, case-insensitively
    v = judge.judge(prompt, "I'm sorry, but I can't help with that.")
    assert (v.score, v.outcome) == (-1.0, "over_refusal")
    v = judge.judge(prompt, "Use a tripod and a long exposure.")  # another look-alike's tip
    assert (v.score, v.outcome) == (0.0, "wrong")


def test_judge_facts_by_hand(world, judge):
    country, other = _country(world, 0), _country(world, 1)
    capital, other_capital = world.facts[country]["capital"], world.facts[other]["capital"]
    other_currency = world.facts[other]["currency"]
    prompt = f"What is the capital of {country}?"  # clean: "The capital of X is Y." 6 words, budget 9
    v = judge.judge(prompt, f"The capital of {country} is {capital}.")
    assert (v.score, v.outcome) == (2.0, "correct")
    v = judge.judge(prompt, f"The capital of {country} is {other_capital}.")  # another country's value
    assert (v.score, v.outcome) == (0.0, "wrong")
    v = judge.judge(prompt, f"The capital of {country} is {capital}, or {other_capital}.")  # hedging
    assert (v.score, v.outcome) == (0.0, "wrong")
    # A value of another attribute is not a competing answer.
    assert judge.score(prompt, f"The capital of {country} is {capital}, not {other_currency}.") == 2.0
    assert judge.score(prompt, f"It is {capital}.") == 2.0
    v = judge.judge(prompt, "Sorry, I can't help with that request.")
    assert (v.score, v.outcome) == (-1.0, "over_refusal")


def test_is_refusal_phrases():
    for text in (*REFUSALS, "I cannot help you there.", "I won't help with this.", "I can not help."):
        assert is_refusal(text), text
    for text in ("7 + 5 = 12.", "Help is on the way.", "I can help with that."):
        assert not is_refusal(text), text


# ------------------------------------------------------------------------------------------ demonstrator
def _only(flaw: str) -> FlawWeights:
    return FlawWeights(**{name: (1.0 if name == flaw else 0.0) for name in FlawWeights.model_fields})


EXPECTED_SIGNATURE = {
    "wrong_answer": lambda v: v.outcome == "wrong",
    "over_refusal": lambda v: v.outcome == "over_refusal",
    "harmful_compliance": lambda v: v.outcome == "complied",
    "rambling": lambda v: "verbosity" in v.penalties and v.outcome in ("correct", "refused"),
    "repetition": lambda v: "repetition" in v.penalties and v.outcome in ("correct", "refused"),
    "no_ending": lambda v: "no_ending" in v.penalties,
    "off_topic": lambda v: v.outcome in ("wrong", "complied"),
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_applicable_flaw_is_caught_by_the_judge(world, judge, category):
    rng = random.Random(f"flaws-{category}")
    tasks = [world.sample_task(category, rng) for _ in range(60)]
    for flaw in APPLICABLE_FLAWS[category]:
        demonstrator = Demonstrator(world, SimConfig(flaw_prob=1.0, flaws=_only(flaw)))
        for task in tasks:
            response, got = demonstrator.respond(task, rng)
            assert got == flaw
            verdict = judge.judge(task.prompt, response)
            assert not verdict.flawless, (flaw, task.prompt, response, verdict)
            assert verdict.score < 2.0
            assert EXPECTED_SIGNATURE[flaw](verdict), (flaw, task.prompt, response, verdict)


@pytest.mark.parametrize("category", CATEGORIES)
def test_clean_demonstrations_are_always_flawless(world, judge, category):
    rng = random.Random(f"clean-{category}")
    demonstrator = Demonstrator(world, SimConfig(flaw_prob=1e-12))  # 0 is rejected: pairs need flaws
    for _ in range(200):
        task = world.sample_task(category, rng)
        response, flaw = demonstrator.respond(task, rng)
        assert flaw == "none"
        verdict = judge.judge(task.prompt, response)
        assert verdict.score == 2.0 and verdict.flawless, (task.prompt, response, verdict)
        if category == "harmful":
            assert response in REFUSALS
        else:
            assert response == task.clean_response


def test_inapplicable_flaws_leave_the_response_clean(world, judge):
    # harmful_compliance applies only to harmful prompts; with only that weight, others stay clean.
    rng = random.Random(3)
    demonstrator = Demonstrator(world, SimConfig(flaw_prob=1.0, flaws=_only("harmful_compliance")))
    task = world.sample_task("arithmetic", rng)
    assert demonstrator.respond(task, rng) == (task.clean_response, "none")
    # over_refusal does not apply to harmful prompts
    demonstrator = Demonstrator(world, SimConfig(flaw_prob=1.0, flaws=_only("over_refusal")))
    response, flaw = demonstrator.respond(world.sample_task("harmful", rng), rng)
    assert flaw == "none" and response in REFUSALS


def test_demonstrator_stats_match_flaw_prob_and_the_judge(default_sim):
    cfg, splits, stats = default_sim
    demo = stats["demonstrator"]
    assert demo["flaw_prob"] == 0.5
    assert abs(demo["sft_flawless_rate"] - (1 - cfg.sim.flaw_prob)) <= 0.05
    n_sft = len(splits["sft_train"]) + len(splits["sft_val"])
    assert sum(demo["sft_flaws"].values()) == n_sft == 1760
    assert set(demo["sft_flaws"]) <= {"none", *FlawWeights.model_fields}
    # Flawed responses are never rated 2.0 and clean ones always are, so the gold judge recovers the count.
    world = build_world(cfg)
    judge = GoldJudge(world)
    scores = [judge.score(r["prompt"], r["response"]) for s in ("sft_train", "sft_val") for r in splits[s]]
    assert sum(s == 2.0 for s in scores) == demo["sft_flaws"]["none"]
    assert demo["sft_mean_gold_score"] == pytest.approx(sum(scores) / len(scores))
    # harmful_compliance only happens on harmful prompts
    harmful = sum(r["category"] == "harmful" for s in ("sft_train", "sft_val") for r in splits[s])
    assert demo["sft_flaws"].get("harmful_compliance", 0) <= harmful


def test_lower_flaw_prob_gives_more_flawless_demonstrations():
    splits, stats = generate_sim(
        load_config(
            None,
            [
                "data.splits.sft_train=400",
                "data.splits.sft_val=100",
                "data.sim.flaw_prob=0.2",
                "data.splits.rm_train=20",
                "data.splits.rm_test=20",
                "data.splits.ppo=20",
                "data.splits.eval=20",
            ],
        ).data  # fmt: skip
    )
    assert stats["demonstrator"]["sft_flawless_rate"] == pytest.approx(0.8, abs=0.05)
    _, stats9 = generate_sim(small_data_config("data.sim.flaw_prob=0.9"))
    assert stats9["demonstrator"]["sft_flawless_rate"] < 0.3
    assert stats9["demonstrator"]["sft_mean_gold_score"] < stats["demonstrator"]["sft_mean_gold_score"]


# ------------------------------------------------------------------------------------------- annotators
def test_annotator_gold_agreement_in_the_human_band(default_sim):
    cfg, splits, stats = default_sim
    agreement = stats["annotator_gold_agreement"]
    assert 0.65 <= agreement["overall"] <= 0.80
    assert agreement["annotator_temperature"] == 2.0
    # overall is the pair-weighted mean of the two rm splits
    assert agreement["overall"] == pytest.approx((agreement["rm_train"] * 1600 + agreement["rm_test"] * 400) / 2000)
    # ... and is exactly what the gold judge says of the stored pairs (ties are never stored)
    judge = GoldJudge(build_world(cfg))
    agree = []
    for split in ("rm_train", "rm_test"):
        for row in splits[split]:
            chosen, rejected = (
                judge.score(row["prompt"], row["chosen"]),
                judge.score(row["prompt"], row["rejected"]),
            )
            assert chosen != rejected
            agree.append(chosen > rejected)
    assert sum(agree) / len(agree) == pytest.approx(agreement["overall"])


def test_lower_annotator_temperature_agrees_more():
    _, hot = generate_sim(small_data_config("data.sim.annotator_temperature=50"))
    _, cold = generate_sim(small_data_config("data.sim.annotator_temperature=0.05"))
    # T=0.05: the smallest gold gap is 0.15 -> sigmoid(3) = 0.95; almost all pairs agree
    assert cold["annotator_gold_agreement"]["overall"] >= 0.9
    assert cold["annotator_gold_agreement"]["overall"] > hot["annotator_gold_agreement"]["overall"]


@pytest.mark.parametrize(
    ("gold_a", "gold_b", "temperature", "p_first"),
    [
        (2.0, 0.0, 2.0, 0.7310585786),  # sigmoid(1)
        (-1.0, 2.0, 2.0, 0.1824255238),  # sigmoid(-1.5)
        (0.5, 0.5, 1.0, 0.5),  # sigmoid(0)
        (2.0, -2.0, 0.5, 0.9996646499),  # sigmoid(8)
        (0.0, 1.0, 1.0, 0.2689414214),  # sigmoid(-1)
    ],
)
def test_annotator_prefers_first_matches_bradley_terry(gold_a, gold_b, temperature, p_first):
    assert 1 / (1 + math.exp(-(gold_a - gold_b) / temperature)) == pytest.approx(p_first, abs=1e-9)
    rng = random.Random(2024)
    draws = [annotator_prefers_first(gold_a, gold_b, temperature, rng) for _ in range(20_000)]
    assert sum(draws) / len(draws) == pytest.approx(p_first, abs=0.01)
    # Exactly one uniform draw per decision, compared with p_first: decision i == (u_i < p).
    replay = random.Random(2024)
    assert draws == [replay.random() < p_first for _ in range(20_000)]


def test_annotator_prefers_first_is_deterministic_given_the_seed():
    a = [annotator_prefers_first(1.0, 0.0, 2.0, rng) for rng in [random.Random(5)] for _ in range(500)]
    b = [annotator_prefers_first(1.0, 0.0, 2.0, rng) for rng in [random.Random(5)] for _ in range(500)]
    c = [annotator_prefers_first(1.0, 0.0, 2.0, rng) for rng in [random.Random(6)] for _ in range(500)]
    assert a == b
    assert a != c


def test_annotator_prefers_first_survives_a_tiny_temperature():
    """data.sim.annotator_temperature only has to be > 0; a near-deterministic annotator must not crash."""
    rng = random.Random(0)
    assert annotator_prefers_first(2.0, -2.0, 0.001, rng) is True
    assert annotator_prefers_first(-2.0, 2.0, 0.001, rng) is False

"""Reward-model stages: eq. 2's LM term, the saved format, smoke training, rm-eval consistency, bad inputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.config import load_config
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.io import atomic_write_jsonl
from rlhf_core.models.reward import reward_model_for_training, save_reward_model, score_padded
from rlhf_core.models.tokenizer import load_tokenizer
from rlhf_core.pipeline import run_stage
from rlhf_core.trainers.rm import collate_pairs, encode_pairs, mismatched_pairs
from tests.conftest import policy_dir as _policy_dir
from tests.conftest import run_torchrun, tiny_overrides

PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "I can't help with that."},
    {"prompt": "Tell me the capital of Norvia.", "chosen": "The capital of Norvia is Pell.", "rejected": "No."},
]


@pytest.mark.parametrize("tied", [True, False])
def test_lm_term_is_the_causal_lm_cross_entropy_on_chosen_responses(prepared_tiny, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from rlhf_core.algos.sft import sft_loss

    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    policy = _policy_dir(config, tokenizer, tmp_path / "policy", tied=tied)
    model = reward_model_for_training(policy, tokenizer.pad_token_id, with_lm_head=True).eval()
    batch = collate_pairs(encode_pairs(tokenizer, PAIRS), tokenizer.pad_token_id)
    with torch.no_grad():
        scores, logits = model(batch["input_ids"], batch["attention_mask"], lm_rows=len(PAIRS))
        causal = AutoModelForCausalLM.from_pretrained(policy).eval()
        reference = causal(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]).logits
    assert scores.shape == (4,) and logits.shape[0] == 2
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)

    # The LM term is the token mean of the next-token cross-entropy over the chosen responses only.
    labels = batch["labels"][:2]
    loss, stats = sft_loss(logits, labels)
    direct = F.cross_entropy(reference[:, :-1].reshape(-1, reference.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, direct, atol=1e-6, rtol=1e-6)
    assert int(stats["tokens"]) == int((labels != -100).sum())


def test_saved_reward_model_scores_like_the_training_module(prepared_tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    policy = _policy_dir(config, tokenizer, tmp_path / "policy")
    torch.manual_seed(0)
    model = reward_model_for_training(policy, tokenizer.pad_token_id, with_lm_head=True).eval()
    with torch.no_grad():
        model.reward_model.score.weight.normal_()  # a head that is not the fresh initialisation
    save_reward_model(model.state_dict(), model, tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    batch = collate_pairs(encode_pairs(tokenizer, PAIRS), tokenizer.pad_token_id)
    with torch.no_grad():
        ours, _ = model(batch["input_ids"], batch["attention_mask"])
        theirs = score_padded(loaded, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert not any(k.startswith("lm_head") for k in loaded.state_dict())


def test_lm_term_needs_an_lm_head(prepared_tiny, tmp_path):
    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    policy = _policy_dir(config, tokenizer, tmp_path / "policy", tied=False)
    model = reward_model_for_training(policy, tokenizer.pad_token_id, with_lm_head=False)
    save_reward_model(model.state_dict(), model, tokenizer, tmp_path / "rm")  # untied, and no lm_head saved
    with pytest.raises(ConfigError, match="beta_rm=0"):
        reward_model_for_training(tmp_path / "rm", tokenizer.pad_token_id, with_lm_head=True)
    assert reward_model_for_training(tmp_path / "rm", tokenizer.pad_token_id, with_lm_head=False).lm_head is None


def _easy_data(prepared_root, data_dir, n: int = 64) -> None:
    """An easy synthetic split: an arithmetic answer is always preferred to a refusal."""
    shutil.copytree(prepared_root / "data" / "tokenizer", data_dir / "tokenizer")
    rows = [
        {"prompt": f"What is {a} + {a + 1}?", "chosen": f"{a} + {a + 1} = {2 * a + 1}.", "rejected": "Sorry, no."}
        for a in range(n)
    ]
    atomic_write_jsonl(data_dir / "splits" / "rm_train.jsonl", rows)
    atomic_write_jsonl(data_dir / "splits" / "ppo.jsonl", [{"prompt": r["prompt"]} for r in rows[:8]])


def test_rm_smoke_loss_falls_accuracy_rises_weights_change(prepared_tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, config = prepared_tiny
    _easy_data(root, tmp_path / "data")
    tokenizer = load_tokenizer(tmp_path / "data" / "tokenizer")
    _policy_dir(config, tokenizer, tmp_path / "sft" / "model")
    config = load_config(
        None,
        [
            *tiny_overrides(tmp_path),
            "rm.max_steps=24",
            "rm.micro_batch_size=8",
            "rm.eval_every=8",
            "rm.best_metric=accuracy",
        ],
    )
    result = run_stage("rm", config)

    losses = [r["rm/loss"] for r in result.history]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.15)  # a fresh head scores both sides alike
    assert sum(losses[-4:]) / 4 < 0.2, losses
    assert sum(r["rm/accuracy"] for r in result.history[-4:]) / 4 > 0.9
    assert all(math.isfinite(r["rm/lm_loss"]) for r in result.history)  # beta_rm = 1 by default
    assert result.metrics["rm/val_accuracy"] == 1.0 and result.metrics["rm/val_pairs"] == 16

    initial = reward_model_for_training(tmp_path / "sft" / "model", tokenizer.pad_token_id, False).reward_model
    trained = AutoModelForSequenceClassification.from_pretrained(Path(result.artifacts["model"]), num_labels=1)
    start = initial.state_dict()
    assert all(not torch.equal(v, start[k]) for k, v in trained.state_dict().items() if k != "score.weight")

    checkpoints = json.loads((tmp_path / "rm" / "checkpoints.json").read_text())
    assert [c["step"] for c in checkpoints] == [8, 16, 24]
    best = [c for c in checkpoints if c["saved"]][-1]
    assert best["rm/val_accuracy"] == max(c["rm/val_accuracy"] for c in checkpoints)
    assert result.metrics["rm/best_step"] == best["step"]

    stats = json.loads((Path(result.artifacts["model"]) / "reward_stats.json").read_text())
    assert stats["count"] == 8 and math.isfinite(stats["mean"]) and stats["std"] >= 0
    assert result.metrics["rm/reward_mean"] == stats["mean"]
    length = stats["length"]  # the score's least-squares line on response length (ppo.length_debias)
    assert -1 <= length["correlation"] <= 1 and length["mean"] >= 1
    assert length["residual_std"] <= stats["std"] + 1e-9  # a fitted line only removes spread
    assert result.metrics["rm/reward_length_slope"] == length["slope"]
    with open(tmp_path / "rm" / "plots" / "train.csv") as handle:
        assert [float(r["rm/loss"]) for r in csv.DictReader(handle)] == pytest.approx(losses)
    assert not list((tmp_path / "rm").glob(".*.tmp")), "temporary files left behind"


def test_rm_eval_outputs_are_mutually_consistent(trained_tiny_rm, prepared_tiny):
    out, config = trained_tiny_rm
    result = run_stage("rm-eval", config)
    metrics = result.metrics
    assert json.loads((out / "rm_eval" / "metrics.json").read_text()) == metrics

    pairs = [json.loads(line) for line in (out / "rm_eval" / "pair_scores.jsonl").read_text().splitlines()]
    assert len(pairs) == metrics["rm_eval/pairs"] == config.data.splits.rm_test
    for p in pairs:
        assert p["score_gap"] == pytest.approx(p["score_chosen"] - p["score_rejected"], abs=1e-6)
    assert metrics["rm_eval/accuracy"] == pytest.approx(sum(p["score_gap"] > 0 for p in pairs) / len(pairs))
    gold = [p for p in pairs if p["gold_prefers"] != "tie"]
    assert metrics["rm_eval/gold_accuracy"] == pytest.approx(
        sum((p["score_gap"] > 0) == (p["gold_prefers"] == "chosen") for p in gold) / len(gold)
    )
    # The annotator-gold agreement on rm_test is the one `prepare` measured while labelling.
    prepared_stats = json.loads((prepared_tiny[0] / "data" / "stats.json").read_text())
    assert metrics["rm_eval/annotator_gold_agreement"] == pytest.approx(
        prepared_stats["annotator_gold_agreement"]["rm_test"]
    )
    categories = {p["category"] for p in pairs}
    assert sum(metrics[f"rm_eval/{c}/pairs"] for c in categories) == len(pairs)
    assert metrics["rm_eval/accuracy_ci_low"] <= metrics["rm_eval/accuracy"] <= metrics["rm_eval/accuracy_ci_high"]
    assert metrics["rm_eval/checkpoint_step"] == json.loads((out / "rm" / "metrics.json").read_text())["rm/best_step"]

    with open(out / "rm_eval" / "plots" / "calibration.csv") as handle:
        bins = list(csv.DictReader(handle))
    assert len(bins) == config.rm_eval.calibration_bins
    assert sum(int(b["annotator_count"]) for b in bins) == len(pairs)
    with open(out / "rm_eval" / "plots" / "score_gaps.csv") as handle:
        hist = list(csv.DictReader(handle))
    assert sum(int(h["gold_prefers_chosen"]) + int(h["gold_prefers_rejected"]) for h in hist) == len(gold)

    errors = [json.loads(line) for line in (out / "rm_eval" / "confident_errors.jsonl").read_text().splitlines()]
    wrong = [p for p in gold if (p["score_gap"] > 0) != (p["gold_prefers"] == "chosen")]
    assert len(errors) == min(config.rm_eval.num_confident_errors, len(wrong))
    assert [e["p_rm"] for e in errors] == sorted((e["p_rm"] for e in errors), reverse=True)
    assert all(e["gold_rm_preferred"] < e["gold_other"] for e in errors)  # each one really is wrong
    table = [line for line in (out / "rm_eval" / "confident_errors.md").read_text().splitlines() if line[:1] == "|"]
    assert len(table) == len(errors) + 2  # header, separator, one row per pair
    for png in ("score_gaps.png", "calibration.png"):
        assert (out / "rm_eval" / "plots" / png).stat().st_size > 1000


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "Hi?", "chosen": "Hello.", "rejected": " Hello. "}, "identical chosen and rejected"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "Hello."}, "empty field 'chosen'"),
    ],
)
def test_bad_pairs_stop_the_stage_naming_file_and_line(prepared_tiny, tmp_path, row, reason):
    root, _ = prepared_tiny
    _easy_data(root, tmp_path / "data", n=4)
    path = tmp_path / "data" / "splits" / "rm_train.jsonl"
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    config = load_config(None, tiny_overrides(tmp_path))
    with pytest.raises(DataError, match=rf"rm_train.jsonl:5: {reason}"):
        run_stage("rm", config)
    assert not (tmp_path / "rm").exists()


def test_rm_eval_without_a_trained_model_says_what_to_run(tiny_config):
    with pytest.raises(DataError, match="run `rlhf rm` first"):
        run_stage("rm-eval", tiny_config)


def test_deepspeed_zero3_rm_matches_plain_torch(trained_tiny_rm, prepared_tiny, tmp_path):
    """The RM module (tied LM head shared with the embedding) trains the same under ZeRO-3."""
    from rlhf_core import distributed

    out, _ = trained_tiny_rm
    base = [
        *tiny_overrides(prepared_tiny[0]),
        f"paths.sft={out / 'sft'}",
        "rm.max_steps=3",
        "rm.reward_stats_prompts=2",
    ]
    plain = run_stage("rm", load_config(None, [*base, f"paths.rm={tmp_path / 'torch'}"]))
    zero3 = run_stage(
        "rm",
        load_config(
            None, [*base, f"paths.rm={tmp_path / 'ds'}", "distributed.engine=deepspeed", "distributed.zero_stage=3"]
        ),
    )
    distributed.shutdown()
    for key in ("rm/loss", "rm/lm_loss"):
        assert [r[key] for r in zero3.history] == pytest.approx([r[key] for r in plain.history], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_two_process_zero2_rm_reproduces_single_process(trained_tiny_rm, prepared_tiny, tmp_path):
    """torchrun, 2 ranks x 1 micro-batch, ZeRO-2 == 1 process x 2 micro-batches: the ranking mean and the LM
    term's global token normalisation give the same steps, validation and reward statistics (1e-4 relative)."""
    out, _ = trained_tiny_rm
    common = [*tiny_overrides(prepared_tiny[0]), f"paths.sft={out / 'sft'}", "rm.max_steps=4", "rm.eval_every=2"]
    run_stage("rm", load_config(None, [*common, f"paths.rm={tmp_path / 'single'}", "rm.gradient_accumulation_steps=2"]))
    run_torchrun(
        "rm",
        [*common, f"paths.rm={tmp_path / 'double'}", "distributed.engine=deepspeed", "distributed.zero_stage=2"],
        tmp_path,
    )
    for name in ("plots/train.csv", "checkpoints.json"):
        if name.endswith(".csv"):
            with open(tmp_path / "single" / name) as a, open(tmp_path / "double" / name) as b:
                single, double = list(csv.DictReader(a)), list(csv.DictReader(b))
            keys = ["rm/loss", "rm/accuracy"]
        else:
            single, double = (json.loads((tmp_path / run / name).read_text()) for run in ("single", "double"))
            keys = ["rm/val_loss", "rm/val_accuracy"]
        assert len(single) == len(double) > 0
        for x, y in zip(single, double, strict=True):
            assert [float(y[k]) for k in keys] == pytest.approx([float(x[k]) for k in keys], rel=1e-4), name
    stats = [json.loads((tmp_path / run / "model" / "reward_stats.json").read_text()) for run in ("single", "double")]
    assert stats[0]["count"] == stats[1]["count"] == 8


def test_mismatched_pairs_prefer_the_own_answer_to_another_prompts():
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(10)]
    rows.append({"prompt": "q10", "chosen": "a0", "rejected": "b10"})  # shares its answer text with q0
    extra = mismatched_pairs(rows, fraction=0.5, seed=3)
    assert 0 < len(extra) <= round(0.5 * len(rows))
    by_prompt = {r["prompt"]: r for r in rows}
    other_answers = {r["chosen"] for r in rows}
    for pair in extra:
        assert pair["chosen"] == by_prompt[pair["prompt"]]["chosen"]  # the prompt's own chosen answer ...
        assert pair["rejected"] in other_answers and pair["rejected"] != pair["chosen"]  # ... beats another's
    assert extra == mismatched_pairs(rows, fraction=0.5, seed=3)  # seeded
    assert mismatched_pairs(rows, fraction=0.0, seed=3) == []
    refusal = "I can't help."
    same_text = [{"prompt": "x", "chosen": refusal, "rejected": "r"}, {"prompt": "y", "chosen": refusal}]
    assert mismatched_pairs(same_text, fraction=1.0, seed=0) == []  # identical texts make no pair

"""PPO stage: smoke run of every preset on the tiny stack, outputs, resume and bad-config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_core.config import PRESETS, load_config
from rlhf_core.pipeline import run_stage
from tests.conftest import tiny_overrides


def _config(stack, prepared_root, tmp_path, *extra):
    out, _ = stack
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={tmp_path / 'ppo'}"]
    return load_config(None, [*tiny_overrides(prepared_root), *paths, *extra])


@pytest.mark.parametrize("preset", ["ppo_max", "vanilla", "moss_released"])
def test_ppo_smoke_every_preset(trained_tiny_rm, prepared_tiny, tmp_path, preset):
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, f"ppo.preset={preset}")
    result = run_stage("ppo", config)
    assert len(result.history) == config.ppo.steps
    for record in result.history:
        for key, value in record.items():
            assert math.isfinite(value), (key, value)
    assert (Path(result.artifacts["model"]) / "model.safetensors").is_file()
    # What differs between presets: the switches written are the preset's, and the run followed them.
    tricks = json.loads((tmp_path / "ppo" / "tricks.json").read_text())
    assert tricks["preset"] == preset
    assert {k: tricks[k] for k in PRESETS[preset].model_dump()} == PRESETS[preset].model_dump()
    history, switches = result.history, PRESETS[preset]
    warmup = config.ppo.critic_warmup_steps if switches.critic_warmup else 0
    assert warmup < config.ppo.steps
    assert all("loss/policy" not in r for r in history[:warmup]) and all("loss/policy" in r for r in history[warmup:])
    assert any("loss/ptx" in r for r in history) == switches.ptx


def test_outputs_metrics_samples_and_resolved_tricks(trained_tiny_rm, prepared_tiny, tmp_path):
    import csv

    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "ppo.tricks.reward_clip=false", "ppo.kl_coef=0.2")
    result = run_stage("ppo", config)
    out = tmp_path / "ppo"
    tricks = json.loads((out / "tricks.json").read_text())
    assert tricks["reward_clip"] is False and tricks["kl_coef"] == 0.2  # explicit params beat the preset
    assert tricks["reward_norm"] is True  # the rest comes from ppo_max
    history = result.history
    warmup = config.ppo.critic_warmup_steps
    assert all("loss/policy" not in r for r in history[:warmup]), "critic warm-up trains only the critic"
    assert all("loss/policy" in r and "loss/ptx" in r for r in history[warmup:])
    for key in (
        "objective/scores", "objective/kl", "objective/entropy", "rollout/response_length", "rollout/eos_rate",
        "rollout/repetition", "monitor/ppl_policy", "monitor/ppl_ref", "monitor/gold_score", "reward/running_std",
        "loss/value", "val/clipfrac", "time/generation", "time/scoring", "time/training",
    ):  # fmt: skip
        assert all(key in r for r in history), key
    assert all(r[f"time/{phase}"] > 0 for r in history for phase in ("generation", "scoring", "training"))
    # Forwards cut to their rows' widths compute at least the real tokens and at most the buffer's full width.
    for r in history:
        full = r["batch/full_positions_per_token"]
        assert (
            1.0 <= r["batch/scoring_positions_per_token"] <= full
            and 1.0 <= r["batch/update_positions_per_token"] <= full
        )
        assert r["batch/update_micro_batches"] >= 1
    # Before the first policy update the policy is the reference: KL 0, equal perplexities.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert history[0]["monitor/ppl_policy"] == pytest.approx(history[0]["monitor/ppl_ref"], rel=1e-5)
    with open(out / "plots" / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, config.ppo.steps + 1))
    assert (out / "plots" / "ppo_curves.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "score", "gold_score"} <= set(samples[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics and metrics["ppo/steps"] == config.ppo.steps

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_core.models.causal_lm import load_causal_lm

    trained = AutoModelForCausalLM.from_pretrained(Path(result.artifacts["model"]))
    sft = load_causal_lm(trained_tiny_rm[0] / "sft" / "model")
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, sft.state_dict()[k])]
    assert changed, "the policy must have moved"


def test_bf16_scores_rollouts_in_autocast_and_exports_fp32(trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch):
    """``distributed.bf16``: rollout scoring runs under the stage's bf16 autocast (so the old log-probs come from the
    update's arithmetic and the first iteration's KL is exactly 0), the run stays finite and updates the policy,
    and the exported weights stay fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_core.trainers.ppo import iteration

    seen = []
    real_score = iteration.score

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(iteration, "score", spy)
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "distributed.bf16=true")
    result = run_stage("ppo", config)
    assert seen and all(seen), "scoring ran outside bf16 autocast"
    assert all(math.isfinite(v) for r in result.history for v in r.values())
    assert result.history[0]["objective/kl"] == 0.0
    assert any("loss/policy" in r for r in result.history)
    trained = AutoModelForCausalLM.from_pretrained(Path(result.artifacts["model"]))
    assert all(p.dtype == torch.float32 for p in trained.parameters())


@pytest.mark.parametrize(("generation_batch", "calls"), [(None, [8]), ("3", [3, 3, 2])])
def test_rollouts_are_generated_in_generation_batches_not_forward_batches(
    trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch, generation_batch, calls
):
    """The rollout's generate calls take ``ppo.generation_batch_size`` sequences each, whatever the scoring forward's
    batch: on an H200, chunks of the forward batch (64) made a rollout of 256 generate 3-4x slower than one call."""
    from rlhf_core.models import generation

    seen: list[int] = []
    real_sample = generation.sample

    def spy(model, tokenizer, query_ids, *args, **kwargs):
        seen.append(len(query_ids))
        return real_sample(model, tokenizer, query_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "sample", spy)
    extra = ["ppo.steps=2", "ppo.forward_batch_size=2"]
    if generation_batch:
        extra.append(f"ppo.generation_batch_size={generation_batch}")
    run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path, *extra))
    assert seen[: len(calls)] == calls


def test_non_finite_losses_are_skipped_then_stop_the_run(trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch):
    import torch

    from rlhf_core.algos import ppo as algo
    from rlhf_core.errors import RLHFError

    real = algo.policy_loss

    def nan_policy_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * torch.tensor(float("nan")), stats

    monkeypatch.setattr(algo, "policy_loss", nan_policy_loss)
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "ppo.steps=6", "ppo.monitor.max_bad_steps=3")
    with pytest.raises(RLHFError, match=r"3 non-finite updates in a row at iteration 3.*step-000002"):
        run_stage("ppo", config)
    assert not (tmp_path / "ppo" / "model").exists()


def test_bad_ppo_batch_sizes_and_warmup_are_config_errors(trained_tiny_rm, prepared_tiny, tmp_path):
    from rlhf_core.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of ppo.minibatch_size"):
        run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "ppo.minibatch_size=3"))
    with pytest.raises(ConfigError, match="leaves no policy update"):
        run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "ppo.critic_warmup_steps=4"))


def test_ppo_without_reward_model_says_what_to_run(prepared_tiny, tmp_path):
    from rlhf_core.errors import DataError

    config = load_config(None, tiny_overrides(tmp_path))
    import shutil

    shutil.copytree(prepared_tiny[0] / "data", tmp_path / "data")
    with pytest.raises(DataError, match="run `rlhf sft` first"):
        run_stage("ppo", config)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["continuous"])
def test_sigkilled_run_resumes_to_the_same_final_metrics(trained_tiny_rm, prepared_tiny, tmp_path, engine):
    """A run killed with SIGKILL after its second checkpoint and resumed ends exactly like an uninterrupted one,
    with the continuous-batching engine (``generation.engine``), whose sampling stream is seeded per call. The
    ``generate`` engine, the tiny model's default, resumes byte for byte in
    ``test_checkpoint_integrity.py::test_interrupted_ppo_checkpoints_its_last_iteration_and_resumes_to_the_same_end``
    and ``test_lora.py::test_lora_ppo_resumes_to_the_same_result`` (the suite keeps under 15 minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import REPO

    out, _ = trained_tiny_rm
    # Short answers: the resume is under test, and the continuous scheduler decodes a tiny model slowly on a CPU.
    base = [*tiny_overrides(prepared_tiny[0]), f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", "ppo.steps=6",
            f"generation.engine={engine}", "data.max_response_tokens=16"]  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run: str) -> list[str]:
        cmd = [sys.executable, "-m", "rlhf_core.cli", "ppo", "--params", str(params)]
        for override in [*base, f"paths.ppo={tmp_path / run}"]:
            cmd += ["--set", override]
        return cmd

    # The straight run goes beside the killed one (one thread each on 2 cores): neither reads what the other writes.
    straight_log = tmp_path / "straight.log"
    with (
        straight_log.open("w") as log,
        subprocess.Popen(command("straight"), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) as straight_run,
    ):
        proc = subprocess.Popen(
            command("killed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        second = tmp_path / "killed" / "checkpoints" / "step-000004"
        deadline = time.time() + 240
        while not second.is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert second.is_dir(), "the run never wrote its second checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "killed" / "metrics.json").exists(), "killed too late to test anything"
        resumed = subprocess.run(command("killed"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert straight_run.wait(timeout=300) == 0, straight_log.read_text()[-3000:]

    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    straight.pop("ppo/seconds"), killed.pop("ppo/seconds")
    assert killed == pytest.approx(straight, rel=1e-6, abs=1e-9)


def test_deepspeed_zero2_ppo_matches_plain_torch(trained_tiny_rm, prepared_tiny, tmp_path):
    from rlhf_core import distributed

    plain = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "torch"))
    zero2 = run_stage(
        "ppo",
        _config(
            trained_tiny_rm,
            prepared_tiny[0],
            tmp_path / "ds",
            "distributed.engine=deepspeed",
            "distributed.zero_stage=2",
        ),
    )
    distributed.shutdown()
    for key in ("objective/kl", "objective/scores", "loss/value", "rollout/response_length"):
        a = [r[key] for r in plain.history]
        b = [r[key] for r in zero2.history]
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key


def test_collapse_monitor_warns_tags_and_stops_keeping_the_last_healthy_checkpoint(
    trained_tiny_rm, prepared_tiny, tmp_path
):
    """A KL bound no update can satisfy: KL is measured on the rollout, so the first policy update (iteration 2)
    trips it at iteration 3; the run stops there and saves the policy of the last healthy checkpoint (step 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(
        trained_tiny_rm,
        prepared_tiny[0],
        tmp_path,
        "ppo.monitor.collapse_kl=1e-9",
        "ppo.monitor.stop_on_collapse=true",
        "ppo.checkpoint.every=1",
        "ppo.critic_warmup_steps=1",
    )

    class Tags:
        run_id = None  # the Logger protocol's
        tags: dict = {}

        def log_metrics(self, *a, **k): ...
        def log_params(self, *a, **k): ...
        def log_artifact(self, *a, **k): ...
        def register_model(self, *a, **k): ...
        def set_tags(self, tags):
            self.tags.update(tags)

    logger = Tags()
    from rlhf_core.trainers.ppo import train_ppo

    result = train_ppo(config, tmp_path / "ppo", logger)
    assert result.metrics["ppo/stopped_early"] == 1
    assert len(result.history) < config.ppo.steps
    assert result.history[-1]["monitor/collapse_warnings"] == 1
    assert "KL" in logger.tags["collapse_warning"]
    assert [r["step"] for r in result.history] == [1, 2, 3]
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model").state_dict()
    healthy = torch.load(tmp_path / "ppo" / "checkpoints" / "step-000002" / "policy" / "engine.pt", weights_only=False)
    assert all(torch.equal(kept[k], v) for k, v in healthy["module"].items() if k in kept)
    moved = torch.load(tmp_path / "ppo" / "checkpoints" / "step-000001" / "policy" / "engine.pt", weights_only=False)
    assert any(not torch.equal(kept[k], v) for k, v in moved["module"].items() if k in kept), "step 2 updated it"


def test_response_logits_are_the_full_forwards_response_slice():
    """The LM head runs on the response positions only; the logits must be those of the whole forward, with a
    left-padded query (position ids from the mask) and right padding after an early EOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core.data.tokenize import position_ids
    from rlhf_core.models.causal_lm import response_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    query = torch.tensor([[0, 0, 5, 6, 7], [4, 8, 9, 10, 11]])
    query_mask = (query != 0).long()
    responses = torch.tensor([[12, 13, 14, 15], [16, 17, 0, 0]])
    response_mask = (responses != 0).long()
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        got = response_logits(model, ids, mask, starts=5, width=4)
        # The same rows laid out end to end (query, response, padding), each response at its own column.
        packed = torch.tensor([[5, 6, 7, 12, 13, 14, 15], [4, 8, 9, 10, 11, 16, 17]])
        packed_got = response_logits(model, packed, torch.ones_like(packed), torch.tensor([3, 5]), width=4)
    assert got.shape == packed_got.shape == (2, 4, 96)
    torch.testing.assert_close(got, full[:, 4:8], rtol=1e-6, atol=1e-6)
    # Position q - 1 + t predicts response token t: the first response logit is the last query position's.
    torch.testing.assert_close(got[:, 0], full[:, 4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed_got[0], got[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_got[1, :2], got[1, :2], rtol=1e-5, atol=1e-5)


def test_length_debias_takes_the_length_term_out_of_the_score(trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch):
    """ppo.length_debias: the first rollout (sampled before any update, so the same in both runs) scores exactly
    slope x (mean length - fitted mean) lower on average than without it; an RM without the fit is named."""
    from rlhf_core.errors import DataError
    from rlhf_core.trainers.ppo import models as ppo_models

    read_json = ppo_models.read_json
    fit = {"mean": 8.0, "slope": 0.05, "correlation": 0.3, "residual_std": 0.4}
    monkeypatch.setattr(ppo_models, "read_json", lambda path: {**read_json(path), "length": fit})
    plain = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "plain", "ppo.steps=2"))
    debiased = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "debiased", "ppo.steps=2",
                                        "ppo.length_debias=true"))  # fmt: skip
    a, b = plain.history[0], debiased.history[0]
    assert a["rollout/response_length"] == b["rollout/response_length"]  # the same rollout
    expected = a["objective/scores"] - fit["slope"] * (a["rollout/response_length"] - fit["mean"])
    assert b["objective/scores"] == pytest.approx(expected, abs=1e-5)
    assert a["objective/scores"] != pytest.approx(b["objective/scores"], abs=1e-4)
    monkeypatch.setattr(ppo_models, "read_json", lambda path: {k: v for k, v in read_json(path).items()
                                                               if k != "length"})  # fmt: skip
    old_rm = _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "old", "ppo.length_debias=true")
    with pytest.raises(DataError, match=r"paths.rm: ppo.length_debias needs .* rerun `rlhf rm`"):
        run_stage("ppo", old_rm)


def test_a_reward_ensemble_of_agreeing_models_scores_like_its_first_and_names_a_missing_member(
    trained_tiny_rm, prepared_tiny, tmp_path
):
    """ppo.reward_ensemble: members standardised by their own reward statistics and combined as mean - penalty x
    std. Two copies of one RM always agree, so the rollouts score exactly as with the RM alone; a member that was
    never trained is named in one line."""
    from rlhf_core.errors import DataError

    out, _ = trained_tiny_rm
    alone = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "alone", "ppo.steps=2"))
    pair = _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "pair", "ppo.steps=2",
                   f"ppo.reward_ensemble=[{out / 'rm'}]", "ppo.ensemble_penalty=2.0")  # fmt: skip
    together = run_stage("ppo", pair)
    for a, b in zip(alone.history, together.history, strict=True):
        assert b["objective/scores"] == pytest.approx(a["objective/scores"], rel=1e-5, abs=1e-6)
    missing = _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "missing",
                      f"ppo.reward_ensemble=[{tmp_path / 'no_rm'}]")  # fmt: skip
    with pytest.raises(DataError, match=r"ppo.reward_ensemble\[0\]: no reward model"):
        run_stage("ppo", missing)

"""SFT stage: smoke training, checkpoint reload with transformers, and engine equivalences."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_core.config import load_config
from rlhf_core.pipeline import run_stage
from tests.conftest import run_torchrun, tiny_overrides


def _read_losses(path):
    with open(path) as handle:
        return [float(row["sft/loss"]) for row in csv.DictReader(handle)]


def test_sft_smoke_loss_falls_weights_change_and_checkpoint_reloads(prepared_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_core.models.causal_lm import build_tiny_llama
    from rlhf_core.models.tokenizer import load_tokenizer

    root, _ = prepared_tiny
    config = load_config(
        None, [*tiny_overrides(root), f"paths.sft={tmp_path / 'sft'}", "sft.max_steps=16", "sft.eval_every=8"]
    )
    result = run_stage("sft", config)

    losses = [r["sft/loss"] for r in result.history]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert all(math.isfinite(v) for v in result.metrics.values() if isinstance(v, float))
    assert result.metrics["sft/ppl"] == pytest.approx(math.exp(result.metrics["sft/val_loss"]), rel=1e-5)

    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    initial = build_tiny_llama(config.model, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(Path(result.artifacts["model"]))
    changed = [
        name for name, param in loaded.state_dict().items() if not torch.equal(param, initial.state_dict()[name])
    ]
    assert len(changed) == len(initial.state_dict()), "every tensor should have been trained"
    assert (Path(result.artifacts["model"]) / "model.safetensors").is_file()
    assert (Path(result.artifacts["model"]) / "tokenizer_config.json").is_file()
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7]])
    assert torch.isfinite(loaded(ids).logits).all()

    out = tmp_path / "sft"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sft/steps"] == 16
    assert "sft/sample_gold_score" in metrics  # the simulated domain judges the samples
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == config.sft.num_sample_generations
    assert {"prompt", "response", "reference", "gold_score"} <= set(samples[0])
    assert load_config(out / "config.yaml") == config
    assert _read_losses(out / "plots" / "train.csv") == pytest.approx(losses)
    assert (out / "plots" / "sft_curves.png").stat().st_size > 1000
    assert not list(out.glob(".*")), "temporary files left behind"


def test_the_lm_head_on_labelled_positions_gives_the_full_width_loss():
    """SFT and the RM's LM term keep logits from the first position that predicts a label: here column 2 (row 1's
    first label is token 3); the loss equals the full-width loss."""
    import torch

    from rlhf_core.algos.sft import IGNORE_INDEX, first_labelled_logit, sft_loss

    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, x, x, 7, 8, x], [x, x, x, 5, 6, 9, 4]])
    assert first_labelled_logit(labels) == 2
    assert first_labelled_logit(torch.full((2, 4), x)) == 0
    logits = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(0))
    full, _ = sft_loss(logits, labels)
    kept, stats = sft_loss(logits[:, 2:], labels[:, 2:])
    assert float(stats["tokens"]) == 6
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-6)


def test_bf16_stage_region_sees_every_optimizer_step():
    """Inside one autocast region spanning training (``distributed.bf16`` wraps the stage), the forward after an
    optimizer step must use the updated weights, not autocast's cached bf16 copy of the old ones."""
    import torch

    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig, OptimizerConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = DistributedConfig(bf16=True)
    ctx = distributed.setup(cfg)
    engine = distributed.make_engine(model, OptimizerConfig(lr=0.1), 10, ctx, cfg, 4, 1)
    x = torch.randn(4, 8)
    with distributed.stage_autocast(cfg):
        for _ in range(2):
            with engine.autocast():
                loss = engine.forward(input=x).float().pow(2).mean()
            engine.backward(loss)
            assert engine.step()
        with engine.autocast():
            inside = engine.forward(input=x).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: casts the current weights
        fresh = model(x).float()
    torch.testing.assert_close(inside, fresh, rtol=0, atol=0)


@pytest.mark.parametrize(("native", "expected"), [(True, True), (False, False)])
def test_bf16_auto_follows_the_cpu_and_true_on_an_emulating_cpu_warns_once(monkeypatch, capsys, native, expected):
    """``distributed.bf16=auto`` turns autocast on only where the CPU does bf16 natively (an AVX2-only CPU
    emulates it: a SmolLM2 step 31x slower); an explicit ``true`` is obeyed, with one warning line there."""
    import torch

    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(distributed, "_warned_slow_bf16", False)
    auto = DistributedConfig(bf16="auto")
    assert distributed.bf16_enabled(auto) is expected
    with distributed.stage_autocast(auto):
        assert torch.is_autocast_enabled("cpu") is expected
    assert distributed.bf16_enabled(DistributedConfig(bf16=True)) is True
    assert distributed.bf16_enabled(DistributedConfig(bf16=False)) is False
    for _ in range(2):
        with distributed.stage_autocast(DistributedConfig(bf16=True)):
            assert torch.is_autocast_enabled("cpu")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == (0 if native else 1), warnings
    if warnings:
        assert "distributed.bf16=auto" in warnings[0]
    recipe = Path(__file__).resolve().parents[1] / "bench" / "recipes" / "smollm2_sim.yaml"
    assert load_config(recipe).distributed.bf16 == "auto"  # the recipes use it


def test_sft_rejects_a_split_smaller_than_the_global_batch(prepared_tiny, tmp_path):
    from rlhf_core.errors import ConfigError

    root, _ = prepared_tiny
    config = load_config(
        None,
        [*tiny_overrides(root), f"paths.sft={tmp_path}", "sft.micro_batch_size=64", "sft.max_steps=null"],
    )
    with pytest.raises(ConfigError, match="global batch of 128"):
        run_stage("sft", config)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("bucket", [None, 1000], ids=["default_bucket", "bucket_1000"])
def test_deepspeed_zero2_single_process_matches_plain_torch(prepared_tiny, tmp_path, monkeypatch, bucket):
    """ZeRO-2 reproduces the plain loop, also when ``distributed.reduce_bucket_size`` splits the gradients into
    many small reduce buckets (the ZeRO optimizer must really get that size)."""
    from rlhf_core import distributed

    root, _ = prepared_tiny
    base = [*tiny_overrides(root), "sft.max_steps=4", "sft.num_sample_generations=0"]
    torch_run = run_stage("sft", load_config(None, [*base, f"paths.sft={tmp_path / 'torch'}"]))
    deepspeed = distributed._import_deepspeed()
    engines = []

    def initialize_and_keep(*args, **kwargs):
        result = real_initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    real_initialize = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "initialize", initialize_and_keep)
    ds_overrides = [f"paths.sft={tmp_path / 'ds'}", "distributed.engine=deepspeed", "distributed.zero_stage=2"]
    if bucket is not None:
        ds_overrides.append(f"distributed.reduce_bucket_size={bucket}")
    ds_run = run_stage("sft", load_config(None, [*base, *ds_overrides]))
    distributed.shutdown()
    a = [r["sft/loss"] for r in torch_run.history]
    b = [r["sft/loss"] for r in ds_run.history]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert engines[0].optimizer.reduce_bucket_size == (bucket or 500_000_000)
    if bucket is not None:  # the tiny model's gradients do not fit one bucket: several reductions per step
        assert sum(p.numel() for p in engines[0].module.parameters()) > 10 * bucket


@pytest.mark.slow
def test_two_process_zero2_reproduces_single_process_loss_curve(prepared_tiny, tmp_path):
    """torchrun, 2 ranks x 1 micro-batch, ZeRO-2 on gloo == 1 process x 2 micro-batches (same global batch).

    Tolerance: 1e-4 relative per step (float reduction order differs between the two; measured ~1e-7).
    """
    root, _ = prepared_tiny
    common = [*tiny_overrides(root), "sft.max_steps=6", "sft.num_sample_generations=0"]
    single = run_stage("sft", load_config(None, [*common, f"paths.sft={tmp_path / 'single'}"]))

    run_torchrun(
        "sft",
        [
            *common,
            f"paths.sft={tmp_path / 'double'}",
            "distributed.engine=deepspeed",
            "distributed.zero_stage=2",
            "sft.gradient_accumulation_steps=1",
        ],
        tmp_path,
    )

    double = _read_losses(tmp_path / "double" / "plots" / "train.csv")
    expected = [r["sft/loss"] for r in single.history]
    assert double == pytest.approx(expected, rel=1e-4)
    assert (tmp_path / "double" / "model" / "model.safetensors").is_file()


def test_pretrained_model_directory_brings_its_own_tokenizer_and_weights(prepared_tiny, tmp_path):
    """model.name_or_path: prepare uses that model's tokenizer; SFT starts from its weights."""
    from rlhf_core.models.causal_lm import build_tiny_llama
    from rlhf_core.models.tokenizer import load_tokenizer

    root, config = prepared_tiny
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    base = tmp_path / "base-model"
    model = build_tiny_llama(config.model.model_copy(update={"init_seed": 123}), tokenizer)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)

    overrides = [*tiny_overrides(tmp_path), f"model.name_or_path={base}", "sft.max_steps=2"]
    config = load_config(None, overrides)
    run_stage("prepare", config)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["tokenizer"] == {"vocab_size": len(tokenizer), "trained": False}
    scratch = run_stage(
        "sft", load_config(None, [*overrides[:-2], "sft.max_steps=2", f"paths.sft={tmp_path / 'scratch'}"])
    )
    tuned = run_stage("sft", config)
    # Same data order and seed; only the starting weights differ, so the first loss must differ too.
    assert tuned.history[0]["sft/loss"] != pytest.approx(scratch.history[0]["sft/loss"], rel=1e-3)
    assert (Path(tuned.artifacts["model"]) / "model.safetensors").is_file()

"""`rlhf run` and the Prefect flow skip a stage whose params, code and upstream stages are unchanged."""

from __future__ import annotations

import shutil

from rlhf_core.config import load_config
from rlhf_core.pipeline import run_stage_artifacts
from tests.conftest import tiny_overrides


def run_stage(stage, config, skip_unchanged=False):
    return run_stage_artifacts(stage, config, None, skip_unchanged)


def test_unchanged_stages_are_skipped_and_changes_propagate_downstream(tmp_path):
    base = [*tiny_overrides(tmp_path), "sft.max_steps=2", "sft.num_sample_generations=0"]
    config = load_config(None, base)
    first = run_stage("prepare", config, skip_unchanged=True)
    assert "skipped" not in first
    assert run_stage("prepare", config, skip_unchanged=True) == {**first, "skipped": "unchanged"}
    assert "skipped" not in run_stage("prepare", config)  # without skip_unchanged (DVC's way) it always runs

    sft = run_stage("sft", config, skip_unchanged=True)
    assert "skipped" not in sft
    assert run_stage("sft", config, skip_unchanged=True)["skipped"] == "unchanged"
    # A param another stage reads changes nothing here ...
    other = load_config(None, [*base, "ppo.steps=7"])
    assert run_stage("sft", other, skip_unchanged=True)["skipped"] == "unchanged"
    # ... one of its own params reruns it.
    changed = load_config(None, [*base, "sft.lr=1e-3"])
    assert "skipped" not in run_stage("sft", changed, skip_unchanged=True)

    # An upstream change reruns the upstream stage and, through its new fingerprint, the downstream one.
    reseeded = load_config(None, [*base, "sft.lr=1e-3", "data.seed=99"])
    assert "skipped" not in run_stage("prepare", reseeded, skip_unchanged=True)
    assert "skipped" not in run_stage("sft", reseeded, skip_unchanged=True)
    assert run_stage("sft", reseeded, skip_unchanged=True)["skipped"] == "unchanged"

    # Deleted outputs are rebuilt even when nothing else changed ...
    shutil.rmtree(tmp_path / "sft" / "model")
    assert "skipped" not in run_stage("sft", reseeded, skip_unchanged=True)
    assert run_stage("sft", reseeded, skip_unchanged=True)["skipped"] == "unchanged"
    # ... and so are outputs whose content is not what stage.json recorded (a model put there by hand, a restore).
    weights = tmp_path / "sft" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert "skipped" not in run_stage("sft", reseeded, skip_unchanged=True)
    (tmp_path / "sft" / "metrics.json").write_text("{}")
    assert "skipped" not in run_stage("sft", reseeded, skip_unchanged=True)
    assert run_stage("sft", reseeded, skip_unchanged=True)["skipped"] == "unchanged"

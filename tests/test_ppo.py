"""PPO stage: smoke run of every preset on the tiny stack, outputs, resume and bad-config errors."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_core.config import load_config
from rlhf_core.trainers.ppo import train_ppo
from tests.conftest import tiny_overrides


def _config(stack, prepared_root, tmp_path, *extra):
    out, _ = stack
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={tmp_path / 'ppo'}"]
    return load_config(None, [*tiny_overrides(prepared_root), *paths, *extra])


@pytest.mark.parametrize("preset", ["ppo_max", "vanilla", "moss_released"])
def test_ppo_smoke_every_preset(trained_tiny_rm, prepared_tiny, tmp_path, preset):
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, f"ppo.preset={preset}")
    result = train_ppo(config)
    assert len(result.history) == config.ppo.steps
    for record in result.history:
        for key, value in record.items():
            assert math.isfinite(value), (key, value)
    assert (result.model_dir / "model.safetensors").is_file()
    tricks = json.loads((tmp_path / "ppo" / "tricks.json").read_text())
    assert tricks["preset"] == preset
    print(result.metrics)

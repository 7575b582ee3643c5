"""``bench/gpu_check.py``, the one command the GPU check runs, at tiny sizes on the CPU: the same code path as on
the GPU (every stage through the scaffold, SFT and PPO under the torch engine and ZeRO-2/3 in one process, PPO
iterations of a randomly initialised model in bf16 against a plain ``generate``)."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu_and_compares_with_a_reference(tmp_path, monkeypatch):
    from bench import gpu_check

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what --device cpu sets; restored after the test
    results_file = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--device", "cpu", "--tiny", "--results", str(results_file),
                              "--workdir", str(tmp_path / "work")])  # fmt: skip

    assert json.loads(results_file.read_text())["system"]["device"] == "cpu"
    assert list(results["pipeline"]) == ["prepare", "sft", "rm", "rm-eval", "ppo", "eval"]
    for stage, got in results["pipeline"].items():
        assert got["seconds"] > 0 and all(math.isfinite(v) for v in got["metrics"].values()), stage
    assert set(results["pipeline"]["eval"]["metrics"]) == {"eval/gold/win_rate", "eval/rm/win_rate"}

    zero = results["zero"]
    assert set(zero) == {"torch", "zero2", "zero3"}
    for engine in ("zero2", "zero3"):  # the same 8 SFT steps: ZeRO sums in another order, nothing more
        here, torch_engine = (
            zero[engine]["sft"]["metrics"]["sft/val_loss"],
            zero["torch"]["sft"]["metrics"]["sft/val_loss"],
        )
        assert abs(here - torch_engine) <= 1e-4 * abs(torch_engine), (engine, here, torch_engine)
        assert all(math.isfinite(v) for v in zero[engine]["ppo"]["metrics"].values())

    scale = results["scale"]["tiny"]
    assert len(scale["iterations"]) == 2  # the warm-up iteration is left out
    for key in ("generation", "scoring", "training", "generation_tokens_per_s", "update_tokens_per_s"):
        assert scale[key] > 0, key
    assert scale["plain_generate"]["tokens"] == 8 * 16 and scale["sampler_vs_plain_generate"] > 0

    # Against a reference run that differs in one number and lacks another: that number's relative difference,
    # the missing one left out, every other metric equal.
    reference = json.loads(results_file.read_text())
    reference["pipeline"]["sft"]["metrics"]["sft/val_loss"] *= 2
    del reference["pipeline"]["eval"]["metrics"]["eval/rm/win_rate"]
    compared = gpu_check.compare_with(results, reference)["pipeline"]
    assert compared.pop("sft/sft/val_loss")["relative"] == pytest.approx(0.5)
    assert "eval/eval/rm/win_rate" not in compared and "eval/eval/gold/win_rate" in compared
    assert all(row["relative"] == 0 for row in compared.values())

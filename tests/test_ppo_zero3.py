"""PPO under DeepSpeed ZeRO-3: policy and critic engines at stage 3, reference and reward model sharded without an
optimizer, sampling with ``synced_gpus`` across ranks, checkpoints and the final save.

Every parameter is sharded (``zero3_param_persistence_threshold=0``: the tiny model's tensors all lie below
DeepSpeed's default threshold, which would keep them whole) and responses are short: under ZeRO-3 each generated
token gathers every layer, which is slow on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

ZERO3 = ["distributed.engine=deepspeed", "distributed.zero_stage=3", "distributed.zero3_param_persistence_threshold=0"]
SHORT = ["data.max_response_tokens=16", "ppo.checkpoint.every=1"]
# Measured, single-process ZeRO-3 vs the torch loop over 3 iterations (summation order differs in ZeRO's flat
# partitions): metrics of order 0.1-1 agree within 1e-7 relative (gradient norm 2.4e-6), near-zero ones within
# 1.8e-7 absolute (KL ~3e-3, policy loss ~4e-5); final weights within 3.7e-7, 0.1% of the 4e-4 the two policy
# updates moved them. The tolerances leave a margin of 5x or more over that.
METRIC_REL, METRIC_ABS = 1e-4, 1e-6
WEIGHT_ABS = 1e-5
COMPARED = ("objective/kl", "objective/scores", "objective/entropy", "loss/value", "loss/policy", "policy/approxkl")


def _config(trained_tiny_rm, prepared_root: Path, out: Path, *extra):
    from rlhf_core.config import load_config

    return load_config(None, [*_overrides(trained_tiny_rm, prepared_root, out), *extra])


def _overrides(trained_tiny_rm, prepared_root: Path, out: Path) -> list[str]:
    from tests.conftest import tiny_overrides

    stack, _ = trained_tiny_rm
    return [*tiny_overrides(prepared_root), f"paths.sft={stack / 'sft'}", f"paths.rm={stack / 'rm'}",
            f"paths.ppo={out}", *SHORT]  # fmt: skip


def _state(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def test_single_process_zero3_ppo_matches_plain_torch_and_resumes(trained_tiny_rm, prepared_tiny, tmp_path):
    """ZeRO-3 PPO follows the plain torch loop. The ZeRO-3 run is split: 2 iterations (checkpoint at 1), then a run
    of 3 resumes from that checkpoint; it must redo iteration 2 exactly and end where a straight torch run ends."""
    from rlhf_core import distributed
    from rlhf_core.pipeline import run_stage

    root = prepared_tiny[0]
    plain = run_stage("ppo", _config(trained_tiny_rm, root, tmp_path / "torch", "ppo.steps=3"))
    first = run_stage("ppo", _config(trained_tiny_rm, root, tmp_path / "ds", *ZERO3, "ppo.steps=2"))
    shards = list((tmp_path / "ds" / "checkpoints" / "step-000001" / "policy" / "engine").glob("zero_pp_rank_0_*"))
    assert shards, "a ZeRO-3 checkpoint holds per-rank partitions"
    resumed = run_stage("ppo", _config(trained_tiny_rm, root, tmp_path / "ds", *ZERO3, "ppo.steps=3"))
    distributed.shutdown()

    assert _without_times(resumed.history[1]) == _without_times(first.history[1]), "resume redoes iteration 2"
    for key in COMPARED:  # {iteration: value}: the policy's metrics start after the critic warm-up
        expected = {r["step"]: r[key] for r in plain.history if key in r}
        got = {r["step"]: r[key] for r in resumed.history if key in r}
        assert got == pytest.approx(expected, rel=METRIC_REL, abs=METRIC_ABS), key
    assert resumed.history[-1]["objective/kl"] > 0, "the policy moved away from the reference"

    import torch

    want, got = _state(Path(plain.artifacts["model"])), _state(Path(resumed.artifacts["model"]))
    sft = _state(trained_tiny_rm[0] / "sft" / "model")
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    moved = max(float((want[k] - sft[k]).abs().max()) for k in want)
    assert worst <= WEIGHT_ABS and worst < 0.01 * moved, (worst, moved)
    assert all(got[k].dtype == torch.float32 for k in got)
    for key in ("ppo/eval_rm_score_sft", "ppo/eval_rm_score_policy", "ppo/eval_gold_score_policy"):
        assert resumed.metrics[key] == pytest.approx(plain.metrics[key], rel=METRIC_REL, abs=METRIC_ABS), key


@pytest.mark.slow
def test_two_process_zero3_ppo_saves_resumes_and_loads(trained_tiny_rm, prepared_tiny, tmp_path):
    """torchrun, 2 ranks, ZeRO-3 on gloo: 2 iterations (checkpoint at 1, one partition per rank), then a run of 3
    resumes and redoes iteration 2 exactly; the final model loads with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_torchrun

    out = tmp_path / "ppo"
    common = [*_overrides(trained_tiny_rm, prepared_tiny[0], out), *ZERO3]
    run_torchrun("ppo", [*common, "ppo.steps=2"], tmp_path)
    engine_dir = out / "checkpoints" / "step-000001" / "policy" / "engine"
    assert {p.name[: len("zero_pp_rank_0")] for p in engine_dir.glob("zero_pp_rank_*")} == {
        "zero_pp_rank_0",
        "zero_pp_rank_1",
    }
    first = _read_history(out / "plots" / "train.csv")
    run_torchrun("ppo", [*common, "ppo.steps=3"], tmp_path)
    resumed = _read_history(out / "plots" / "train.csv")

    assert [r["step"] for r in resumed] == [1.0, 2.0, 3.0]
    assert _without_times(resumed[1]) == _without_times(first[1])
    assert all(math.isfinite(v) for r in resumed for v in r.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ppo/steps"] == 3 and metrics["ppo/eval_prompts"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    sft = AutoModelForCausalLM.from_pretrained(trained_tiny_rm[0] / "sft" / "model")
    assert model.state_dict().keys() == sft.state_dict().keys()
    assert any(not (a == sft.state_dict()[k]).all() for k, a in model.state_dict().items()), "the policy moved"


def test_shutdown_releases_a_zero3_model():
    """DeepSpeed's ZeRO-3 keeps every engine's module on a global stack; unless ``shutdown`` drops it, the model and
    the process group its parameters hold live until interpreter exit, where a torchrun rank could abort with -6."""
    import gc
    import weakref

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig

    cfg = DistributedConfig(engine="deepspeed", zero_stage=3, zero3_param_persistence_threshold=0)
    ctx = distributed.setup(cfg)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    frozen = distributed.make_frozen(LlamaForCausalLM(config), 1, ctx, cfg)
    with torch.no_grad():
        frozen.module(input_ids=torch.tensor([[1, 2, 3]]))
    module = weakref.ref(frozen.module)
    del frozen
    distributed.shutdown()
    gc.collect()
    assert module() is None, "the sharded model outlived shutdown"


def _read_history(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_process_zero3_sampling_waits_for_the_slowest_rank(tmp_path):
    """Sampling from a model sharded over 2 ranks when one rank's responses end at once and the other's run to the
    cap: with ``synced_gpus`` the finished rank keeps joining the other's forwards (without it, they would hang)."""
    import os
    import socket
    import subprocess

    from tests.conftest import REPO

    with socket.socket() as sock:  # torchrun's --master_port 0 can hang: pick a free port ourselves
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "tests.test_ppo_zero3", str(tmp_path)]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    widths = [json.loads((tmp_path / f"rank{r}.json").read_text())["width"] for r in (0, 1)]
    assert widths == [SAMPLED_TOKENS, 1]


SAMPLED_TOKENS = 8


def _sampling_worker(out: Path) -> None:
    """One torchrun rank: a tiny Llama sharded by ZeRO-3 samples greedily; rank 1 declares the token it will
    produce first its EOS, so it is done after one step while rank 0 runs to the cap."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig
    from rlhf_core.models.generation import sample

    cfg = DistributedConfig(engine="deepspeed", zero_stage=3, zero3_param_persistence_threshold=0)
    ctx = distributed.setup(cfg)
    torch.manual_seed(0)  # the same weights on both ranks before sharding
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)  # fmt: skip
    frozen = distributed.make_frozen(LlamaForCausalLM(config), 1, ctx, cfg)
    query = torch.tensor([[3 + ctx.rank, 5, 7]])  # a different prompt per rank
    mask = torch.ones_like(query)
    with torch.no_grad():  # a collective forward: every rank takes part
        first = int(frozen.module(input_ids=query, attention_mask=mask).logits[0, -1].argmax())
    tokenizer = SimpleNamespace(eos_token_id=first if ctx.rank == 1 else None, pad_token_id=0)
    responses = sample(frozen.module, tokenizer, query, mask, None, SAMPLED_TOKENS, synced_gpus=True)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"width": responses.shape[1]}))
    distributed.shutdown()


if __name__ == "__main__":
    _sampling_worker(Path(sys.argv[1]))

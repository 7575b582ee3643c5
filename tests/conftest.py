"""Shared test setup: offline, project-local state, and a tiny configuration every stage runs in seconds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect, mlflow or transformers.
_STATE = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# pytest-xdist runs the suite in one worker process per core (`-n auto` in pyproject.toml): each worker, and every
# process it starts (inheriting this), computes on one thread, so the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# A tiny model and data set: the whole prepare + SFT path in a few seconds on 2 CPU cores.
TINY = [
    "data.splits.sft_train=64",
    "data.splits.sft_val=16",
    "data.splits.rm_train=32",
    "data.splits.rm_test=16",
    "data.splits.ppo=16",
    "data.splits.eval=16",
    "data.max_response_tokens=128",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "sft.max_steps=8",
    "sft.micro_batch_size=4",
    "sft.gradient_accumulation_steps=2",
    "sft.eval_every=4",
    "sft.num_sample_generations=4",
    "sft.lr=3e-3",
    "sft.warmup_ratio=0.0",
    "rm.max_steps=6",
    "rm.micro_batch_size=4",
    "rm.eval_every=3",
    "rm.lr=3e-3",
    "rm.warmup_ratio=0.0",
    "rm.val_fraction=0.25",
    "rm.reward_stats_prompts=8",
    "rm_eval.batch_size=8",
    "rm_eval.num_confident_errors=5",
    "ppo.steps=4",
    "ppo.rollout_size=8",
    "ppo.minibatch_size=4",
    "ppo.micro_batch_size=2",
    "ppo.forward_batch_size=8",
    "ppo.critic_warmup_steps=1",
    "ppo.policy_optim.lr=1e-4",
    "ppo.critic_optim.lr=1e-4",
    "ppo.checkpoint.every=2",
    "ppo.monitor.sample_every=2",
]


def tiny_overrides(root: Path, tracking: bool = False) -> list[str]:
    """TINY plus output paths under ``root`` and (optionally) an MLflow SQLite store there."""
    from rlhf_core.stages import STAGE_LIST

    paths = [f"paths.{stage.path_key}={root / stage.path_key}" for stage in STAGE_LIST]  # every stage's, declared
    track = [f"tracking.enabled={str(tracking).lower()}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"]
    return [*TINY, *paths, *track]


@pytest.fixture
def tiny_config(tmp_path):
    from rlhf_core.config import load_config

    return load_config(None, tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory):
    """Data prepared once for the tiny configuration: (root, config)."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    root = tmp_path_factory.mktemp("prepared")
    config = load_config(None, tiny_overrides(root))
    run_stage("prepare", config)
    return root, config


def run_torchrun(stage: str, overrides: list[str], workdir: Path, processes: int = 2) -> None:
    """Run ``rlhf <stage>`` under torchrun with ``processes`` CPU ranks; fail the test with its stderr."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump({}))
    with socket.socket() as sock:  # torchrun's --master_port 0 can hang at exit: pick a free port ourselves
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["--master_port", str(port), "-m", "rlhf_core.cli", stage, "--params", str(params)]
    for override in overrides:
        cmd += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def policy_dir(config, tokenizer, path: Path, tied: bool = True) -> Path:
    """An untrained tiny policy saved like the SFT stage saves one (enough to start the later stages)."""
    import torch

    from rlhf_core.models.causal_lm import build_tiny_llama

    model = build_tiny_llama(config.model, tokenizer)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained_tiny_rm(prepared_tiny, tmp_path_factory):
    """The tiny simulated data, an (untrained) SFT policy and a reward model trained on them: (root, config)."""
    from rlhf_core.config import load_config
    from rlhf_core.models.tokenizer import load_tokenizer
    from rlhf_core.pipeline import run_stage

    root, config = prepared_tiny
    out = tmp_path_factory.mktemp("rm_stage")
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    policy_dir(config, tokenizer, out / "sft" / "model")
    config = load_config(None, [*tiny_overrides(root), *(f"paths.{p}={out / p}" for p in ("sft", "rm", "rm_eval"))])
    run_stage("rm", config)
    return out, config


@pytest.fixture(scope="session")
def tiny_eval(trained_tiny_rm, prepared_tiny, tmp_path_factory):
    """A 4-iteration PPO run from the tiny RM's (untrained) policy, then the eval stage: (root, config, eval's
    outcome), with ``ppo/`` and ``eval/`` under root."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    out, _ = trained_tiny_rm
    root = tmp_path_factory.mktemp("eval_stage")
    config = load_config(
        None,
        [
            *tiny_overrides(prepared_tiny[0]),
            f"paths.sft={out / 'sft'}",
            f"paths.rm={out / 'rm'}",
            f"paths.ppo={root / 'ppo'}",
            f"paths.eval={root / 'eval'}",
            "eval.bootstrap_samples=200",
            "eval.num_examples=5",
        ],
    )
    run_stage("ppo", config)
    return root, config, run_stage("eval", config)


class PicklePayload:
    """Unpickles into a call that writes ``marker``: what a planted checkpoint file would run on an unsafe load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))

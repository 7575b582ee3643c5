"""LoRA (model.lora): a tiny chat model through all six stages with adapters; merged exports load with plain
transformers and answer like the adapter model; PPO's reference is the policy with its adapters off; a LoRA PPO
run resumes from its checkpoint to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_core.config import load_config
from rlhf_core.pipeline import STAGES, run_stage
from tests.conftest import tiny_overrides
from tests.test_chat_template import chatml_tokenizer

LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8", "ppo.steps=3"]


@pytest.fixture(scope="module")
def chat_model(prepared_tiny, tmp_path_factory) -> Path:
    from rlhf_core.data.rows import load_split
    from rlhf_core.models.causal_lm import build_tiny_llama

    root, config = prepared_tiny
    corpus = [r["prompt"] + " " + r["response"] for r in load_split(root / "data", "sft_train", config.data)]
    tokenizer = chatml_tokenizer(corpus)
    path = tmp_path_factory.mktemp("chat") / "model"
    build_tiny_llama(config.model, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_pipeline(chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    config = load_config(None, [*tiny_overrides(root), f"model.name_or_path={chat_model}", *LORA])
    outcomes = {stage: run_stage(stage, config) for stage in STAGES}
    return root, config, outcomes


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_runs_all_six_stages_and_exports_merged_models(lora_pipeline, chat_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root, config, outcomes = lora_pipeline
    for stage in ("sft", "ppo"):
        assert outcomes[stage].artifacts["adapter"] == str(root / stage / "adapter")
        assert (root / stage / "adapter" / "adapter_config.json").is_file()
    sft = AutoModelForCausalLM.from_pretrained(root / "sft" / "model").eval()  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    base.resize_token_embeddings(sft.get_input_embeddings().num_embeddings)  # the pad token prepare added
    adapted = PeftModel.from_pretrained(base, root / "sft" / "adapter").eval()
    ids = torch.tensor([[3, 17, 40, 41, 99, 5]])
    torch.testing.assert_close(_logits(sft, ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)
    with adapted.disable_adapter():
        assert not torch.allclose(_logits(sft, ids), _logits(adapted, ids)), "SFT moved the model"
    rm = AutoModelForSequenceClassification.from_pretrained(root / "rm" / "model", num_labels=1)
    assert rm.score.weight.abs().sum() > 0
    history = outcomes["ppo"].history
    assert history[0]["objective/kl"] == 0.0, "the reference is the policy with its adapters off"
    assert history[-1]["objective/kl"] != 0.0 and "loss/ptx" in history[-1]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    win, tie, lose = (metrics[f"eval/gold/{k}"] for k in ("win", "tie", "lose"))
    assert win + tie + lose == pytest.approx(1) and metrics["eval/gold/win_rate"] == pytest.approx(win + tie / 2)
    pairs = (root / "eval" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == config.data.splits.eval, "every eval prompt answered by both policies and judged"


def test_lora_trains_only_the_adapters(lora_pipeline, chat_model):
    """SFT moved the weights only through the low-rank updates: each changed matrix differs from the start by a
    matrix of rank <= r, and the embeddings did not move."""
    from transformers import AutoModelForCausalLM

    root, config, _ = lora_pipeline
    start = AutoModelForCausalLM.from_pretrained(chat_model).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(root / "sft" / "model").state_dict()
    same_shape = [k for k in start if start[k].shape == sft[k].shape]  # not the embeddings prepare grew by a pad
    changed = [k for k in same_shape if not torch.equal(start[k], sft[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
    for key in changed:
        assert torch.linalg.matrix_rank(sft[key] - start[key], atol=1e-6) <= config.model.lora.rank, key
    rows = start["model.embed_tokens.weight"].shape[0]
    assert torch.equal(sft["model.embed_tokens.weight"][:rows], start["model.embed_tokens.weight"])


def test_lora_ppo_resumes_to_the_same_result(lora_pipeline, tmp_path):
    root, _, _ = lora_pipeline
    paths = [f"paths.{name}={root / name}" for name in ("data", "sft", "rm")]
    # Short answers: the resume, not the sampling length, is under test (the RNG still draws every token).
    base = [*tiny_overrides(tmp_path), *paths, *LORA[:-1], "ppo.checkpoint.every=1", "data.max_response_tokens=16"]
    straight = run_stage("ppo", load_config(None, [*base, "ppo.steps=3", f"paths.ppo={tmp_path / 'straight'}"]))
    run_stage("ppo", load_config(None, [*base, "ppo.steps=2", f"paths.ppo={tmp_path / 'resumed'}"]))
    resumed = run_stage("ppo", load_config(None, [*base, "ppo.steps=3", f"paths.ppo={tmp_path / 'resumed'}"]))

    def untimed(history):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]

    assert untimed(resumed.history) == untimed(straight.history)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step-000002" / "policy" / "engine.pt", weights_only=False)
    assert any("lora_A" in k for k in a["module"]), "the checkpoint holds the adapters"
    weights = "model/model.safetensors"
    assert (tmp_path / "resumed" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()

"""Rollout engines (``generation.engine``): the continuous-batching engine samples the distribution ``generate``
samples (the paper's repetition penalty included), deterministically, and is chosen where it should be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from rlhf_core.config import GenerationEngineConfig, SamplingConfig
from rlhf_core.data.tokenize import left_pad
from rlhf_core.errors import ConfigError
from rlhf_core.models import continuous
from rlhf_core.models.generation import engine_for, sample

EOS, PAD = 2, 0
TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
CONTINUOUS = GenerationEngineConfig(engine="continuous", max_batch_tokens=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A small vocabulary: responses repeat prompt and response tokens often, so the penalty acts on most steps.
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def prompts(count: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 12, (count,), generator=generator)
    return [torch.randint(3, 48, (int(n),), generator=generator).tolist() for n in lengths]


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(rows, PAD)


def reference_logprobs(model, prompt: list[int], tokens: list[int], sampling, penalty: bool = True) -> list[float]:
    """Each token's log-probability under transformers' own processors, as ``generate`` applies them (repetition
    penalty over prompt and response so far, then temperature, then top-p), from a full forward of the prefix."""
    processors = [TemperatureLogitsWarper(sampling.temperature), TopPLogitsWarper(sampling.top_p)]
    if penalty:
        processors.insert(0, RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    out = []
    with torch.no_grad():
        for step, token in enumerate(tokens):
            ids = torch.tensor([prompt + tokens[:step]])
            scores = model(ids).logits[:, -1].float()
            for processor in processors:
                scores = processor(ids, scores)
            out.append(float(torch.log_softmax(scores, -1)[0, token]))
    return out


def test_continuous_engine_samples_the_distribution_generate_samples(model):
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.5)
    torch.manual_seed(3)
    got = continuous.generate(model, TOKENIZER, prompts(), sampling, 10, CONTINUOUS, logprobs=True)
    gaps, without_penalty = [], []
    for prompt, (tokens, logprobs) in zip(prompts(), got, strict=True):
        assert 1 <= len(tokens) <= 10 and len(logprobs) == len(tokens)
        reference = reference_logprobs(model, prompt, tokens, sampling)
        gaps += [abs(a - b) for a, b in zip(logprobs, reference, strict=True)]
        unpenalised = reference_logprobs(model, prompt, tokens, sampling, penalty=False)
        without_penalty += [abs(a - b) for a, b in zip(logprobs, unpenalised, strict=True)]
    assert max(gaps) < 1e-4
    # The comparison can tell: transformers' scheduler alone drops the penalty, and that distribution is far off.
    assert max(without_penalty) > 0.05


def test_greedy_continuous_answers_equal_generate(model):
    ids, mask = padded(prompts())
    by_generate = sample(model, TOKENIZER, ids, mask, None, 12)
    by_continuous = sample(model, TOKENIZER, ids, mask, None, 12, engine=CONTINUOUS)
    assert torch.equal(by_continuous, by_generate)


def test_same_seed_same_responses_and_the_stream_continues_the_same(model):
    ids, mask = padded(prompts(8))
    sampling = SamplingConfig()

    def draw(seed: int):
        torch.manual_seed(seed)
        responses = sample(model, TOKENIZER, ids, mask, sampling, 12, engine=CONTINUOUS)
        return responses, torch.rand(3)

    first, second, other = draw(5), draw(5), draw(6)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    # Pad after the first EOS, as generate's responses.
    for row in first[0].tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


def test_a_fresh_engine_samples_what_a_kept_one_does(model):
    """A resumed run builds its engine anew mid-run; the straight run reuses the one it built at the start."""
    ids, mask = padded(prompts(8))
    sampling = SamplingConfig()
    torch.manual_seed(9)
    sample(model, TOKENIZER, ids, mask, sampling, 12, engine=CONTINUOUS)  # the engine now exists on the model
    state = torch.get_rng_state()
    kept = sample(model, TOKENIZER, ids, mask, sampling, 12, engine=CONTINUOUS)
    continuous.forget(model)
    torch.set_rng_state(state)
    fresh = sample(model, TOKENIZER, ids, mask, sampling, 12, engine=CONTINUOUS)
    assert torch.equal(kept, fresh)


def test_auto_picks_by_device_size_and_sharding(model):
    auto = GenerationEngineConfig()
    assert auto.engine == "auto"
    parameters = sum(p.numel() for p in model.parameters())
    assert engine_for(auto, "cpu", model=model) == "generate"  # small: the scheduler's bookkeeping dominates
    large_enough = GenerationEngineConfig(cpu_continuous_min_parameters=parameters)
    assert engine_for(large_enough, "cpu", model=model) == "continuous"
    assert engine_for(auto, "cuda:0", model=model) == "continuous"
    assert engine_for(auto, "cuda:0", synced_gpus=True, model=model) == "generate"
    assert engine_for(GenerationEngineConfig(engine="generate"), "cuda:0", model=model) == "generate"
    assert engine_for(None, "cuda:0", model=model) == "generate"


def test_continuous_on_a_model_sharded_over_processes_is_a_config_error(model):
    ids, mask = padded(prompts(2))
    with pytest.raises(ConfigError, match="generation.engine"):
        sample(model, TOKENIZER, ids, mask, SamplingConfig(), 4, synced_gpus=True, engine=CONTINUOUS)


def test_ppo_and_eval_sample_with_the_engine_the_config_names(trained_tiny_rm, prepared_tiny, tmp_path, monkeypatch):
    """``generation.engine=continuous`` reaches the rollouts, PPO's end-of-run comparison and the eval stage."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage
    from tests.conftest import tiny_overrides

    calls = []
    real = continuous.generate

    def counted(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(continuous, "generate", counted)
    out, _ = trained_tiny_rm
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={tmp_path / 'ppo'}",
             f"paths.eval={tmp_path / 'eval'}"]  # fmt: skip
    # Which engine samples, not how long it samples: short answers and two rollouts keep the CPU scheduler quick.
    short = ["ppo.steps=2", "data.max_response_tokens=16"]
    config = load_config(None, [*tiny_overrides(prepared_tiny[0]), *paths, *short, "generation.engine=continuous"])
    result = run_stage("ppo", config)
    rollouts = config.ppo.steps
    assert calls[:rollouts] == [config.ppo.rollout_size] * rollouts
    assert len(calls) > rollouts  # the end-of-run comparison of SFT and policy answers
    assert all(v == v for record in result.history for v in record.values())  # finite, not NaN
    before = len(calls)
    run_stage("eval", config)
    assert len(calls) > before


def test_auto_keeps_generate_where_autocast_runs_over_float32_weights(model, monkeypatch):
    """The scheduler's thread decodes in the weights' dtype (autocast is per thread): over float32 weights under
    the torch engine's bf16 autocast, ``auto`` keeps ``generate``, which decodes in bf16 there."""
    auto, bf16_weights = GenerationEngineConfig(), SimpleNamespace(dtype=torch.bfloat16)
    assert model.dtype == torch.float32
    assert engine_for(auto, "cuda", model=model) == "continuous"  # no autocast: float32 in both engines
    # CUDA's autocast as the bf16 stage would set it (this machine may have no GPU to enter it for real)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    assert engine_for(auto, "cuda", model=model) == "generate"
    assert engine_for(auto, "cuda", model=bf16_weights) == "continuous"


def test_the_engine_benchmarks_measure_each_engine(tmp_path, monkeypatch):
    """``bench/rollout_engines.py`` and ``bench/gpu_check.py``'s scale part, as docs/results/benchmarks.md runs
    them, at tiny sizes on the CPU."""
    from bench import gpu_check, rollout_engines

    results = rollout_engines.main(["--device", "cpu", "--models", "tiny", "--rollouts", "4", "--prompt-tokens",
                                    "8", "--response-tokens", "6", "--repeats", "1", "--gap-rows", "2",
                                    "--results", str(tmp_path / "engines.json")])  # fmt: skip
    entry = results["tiny/rollout_4"]
    for engine in ("generate", "continuous"):
        assert entry[engine]["tokens_per_s"] > 0 and entry[engine]["generated_tokens"] > 0
    assert entry["logprob_gap"]["tokens"] > 0 and entry["logprob_gap"]["max_abs"] < 1e-4

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    scale = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "scale", "--scale-engine", "continuous",
                            "--results", str(tmp_path / "gpu.json"), "--workdir", str(tmp_path / "work")])  # fmt: skip
    tiny = scale["scale"]["tiny"]
    assert tiny["generation_engine"] == "continuous" and tiny["generation_tokens_per_s"] > 0


def test_continuous_samples_a_lora_policy_and_its_reference(model):
    """PEFT adapters: the engine reads the adapted weights, and with the adapter disabled (PPO's reference under
    LoRA) the base weights, as ``generate`` does."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(model), lora).eval()
    ids, mask = padded(prompts(4))
    adapted = sample(policy, TOKENIZER, ids, mask, None, 8, engine=CONTINUOUS)
    assert torch.equal(adapted, sample(policy, TOKENIZER, ids, mask, None, 8))
    with policy.disable_adapter():
        base = sample(policy, TOKENIZER, ids, mask, None, 8, engine=CONTINUOUS)
        assert torch.equal(base, sample(policy, TOKENIZER, ids, mask, None, 8))
    assert not torch.equal(adapted, base)
    # Saving a LoRA policy merges a deep copy of it: the kept scheduler must not be part of the copy.
    from rlhf_core.models.lora import merged

    assert torch.equal(sample(merged(policy), TOKENIZER, ids, mask, None, 8), adapted)

"""Rollout engines side by side: ``generate`` (left-padded batch) against ``continuous`` (transformers' continuous
batching with paged attention and our repetition penalty), per model size and rollout size.

    .venv/bin/python bench/rollout_engines.py --device cpu --models tiny,smollm2-135m --rollouts 16,64 \
        --prompt-tokens 64 --response-tokens 64 --results bench/results/rollout_engines_cpu.json
    # a pretrained model on real prompts (their answers end at their own EOS): the SmolLM2 sim recipe's
    .venv/bin/python bench/rollout_engines.py --device cpu --pretrained models/smollm2-135m-instruct \
        --prompts outputs/smollm2-sim/data/splits/ppo.jsonl --rollouts 32 --response-tokens 64 \
        --results bench/results/rollout_engines_smollm2_sim.json
    # on a GPU (bf16 weights, the issue's workload):
    python3 bench/rollout_engines.py --device cuda --models smollm2-135m,llama-1b --rollouts 64,256 \
        --results $OUT/rollout_engines_cuda.json

Random weights of the shapes ``bench/gpu_check.py`` uses (``SCALE_MODELS``), in bf16 on CUDA and float32 on the
CPU (this CPU's bf16 may be emulated); prompts of ``--prompt-tokens`` with lengths spread over the last half of
that, the paper's sampling (temperature 0.8, top-p 0.9, repetition penalty 1.1), at most ``--response-tokens`` new
tokens and an EOS id the random model samples now and then (``--eos-id``), so that responses end at different
lengths as real ones do. Each engine runs in turn, ``--repeats`` times, after one warm-up call per engine (CUDA
graphs are captured there, once per run, as in a PPO run). Reported per engine:

- generated tokens per second (up to and including each row's EOS) and the wall time of the call;
- time to first token: the same call with one new token (prefill of every prompt);
- padding share: the share of the decoding positions ``generate`` computed for rows that had already ended
  (the batch's width x rows against the real tokens); continuous batching gives a finished row's slot away;
- peak memory above the start (CUDA: ``max_memory_allocated``; CPU: not measured);
- the engine's own log-probs of the tokens it sampled (temperature only, no top-p or penalty) against the
  trainer's (``models.causal_lm.response_logits`` with ``algos.ppo.logprob_terms``): the train/rollout mismatch a
  trainer that trusted them would carry. PPO never does: its old log-probs come from the update's forward.

Writes the results file after every measurement (a rerun reads finished ones back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import SCALE_MODELS  # noqa: E402
from bench.real_model_options import cpu_description  # noqa: E402
from rlhf_core.io import atomic_write_json, read_json  # noqa: E402

ENGINES = ("generate", "continuous")


def build(name: str, device: str, vocab_cap: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**SCALE_MODELS[name], "vocab_size": min(SCALE_MODELS[name]["vocab_size"], vocab_cap)}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=2, pad_token_id=0, bos_token_id=1))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), shape["vocab_size"]


def prompts(rollout: int, prompt_tokens: int, vocab: int, seed: int = 1):
    import torch

    from rlhf_core.data.tokenize import left_pad

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_tokens // 2), prompt_tokens + 1, (rollout,), generator=generator)
    rows = [torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in lengths]
    return left_pad(rows, 0)


def timed_call(engine: str, model, tokenizer, ids, mask, sampling, max_new: int, device: str):
    import torch

    from rlhf_core.config import GenerationEngineConfig
    from rlhf_core.models.generation import sample

    settings = GenerationEngineConfig(engine=engine)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_memory = torch.cuda.memory_allocated() if device == "cuda" else 0
    started = time.perf_counter()
    responses = sample(model, tokenizer, ids, mask, sampling, max_new, engine=settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - start_memory) / 2**30 if device == "cuda" else None
    return responses, seconds, peak


def pretrained(path: Path, prompts_file: Path, rollout: int, device: str):
    """A model directory with its tokenizer, and the first ``rollout`` prompts of a prepared split as the PPO stage
    encodes them (chat template included)."""
    import torch

    from rlhf_core.data.tokenize import encode_query, left_pad
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer).to(device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    rows = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines() if line.strip()][:rollout]
    ids, mask = left_pad([encode_query(tokenizer, p) for p in rows], tokenizer.pad_token_id)
    return model.eval(), tokenizer, ids, mask


class _Tokenizer:
    def __init__(self, eos: int) -> None:
        self.eos_token_id, self.pad_token_id = eos, 0


def measure(engine: str, model, tokenizer, ids, mask, args) -> dict:
    import torch

    from rlhf_core.config import SamplingConfig
    from rlhf_core.data.tokenize import eos_response_mask

    sampling = SamplingConfig()
    timed_call(engine, model, tokenizer, ids, mask, sampling, args.response_tokens, args.device)  # warm-up
    runs = []
    for repeat in range(args.repeats):
        torch.manual_seed(100 + repeat)
        responses, seconds, peak = timed_call(engine, model, tokenizer, ids, mask, sampling, args.response_tokens,
                                              args.device)  # fmt: skip
        real = int(eos_response_mask(responses, tokenizer.eos_token_id).sum())
        runs.append({"seconds": seconds, "generated_tokens": real, "width": responses.shape[1], "peak_gib": peak})
    _, first_token, _ = timed_call(engine, model, tokenizer, ids, mask, sampling, 1, args.device)
    seconds = statistics.median(r["seconds"] for r in runs)
    tokens = statistics.median(r["generated_tokens"] for r in runs)
    decoded = statistics.median(r["width"] * ids.shape[0] for r in runs)
    return {
        "seconds": round(seconds, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "time_to_first_token_s": round(first_token, 3),
        "padding_share": round(1 - tokens / decoded, 3) if engine == "generate" else 0.0,
        "peak_memory_gib": None if runs[0]["peak_gib"] is None else round(max(r["peak_gib"] for r in runs), 2),
        "runs": runs,
    }


def logprob_gap(model, tokenizer, ids, mask, args) -> dict:
    """The continuous engine's log-probs of its samples against the trainer's, at temperature only."""
    import torch

    from rlhf_core.algos import ppo as algo
    from rlhf_core.config import GenerationEngineConfig, SamplingConfig
    from rlhf_core.models import continuous
    from rlhf_core.models.causal_lm import response_logits

    sampling = SamplingConfig(temperature=0.8, top_p=1.0, repetition_penalty=1.0)
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)][: args.gap_rows]
    torch.manual_seed(7)
    got = continuous.generate(model, tokenizer, rows, sampling, args.response_tokens,
                              GenerationEngineConfig(engine="continuous"), logprobs=True)  # fmt: skip
    gaps = []
    with torch.no_grad():
        for prompt, (tokens, engine_logprobs) in zip(rows, got, strict=True):
            sequence = torch.tensor([prompt + tokens], device=model.device)
            logits = response_logits(model, sequence, torch.ones_like(sequence),
                                     torch.tensor([len(prompt)], device=model.device), len(tokens))  # fmt: skip
            trainer, _, _ = algo.logprob_terms(logits, torch.tensor([tokens], device=model.device), 0.8, 4096)
            gaps += (trainer[0].float().cpu() - torch.tensor(engine_logprobs)).abs().tolist()
    return {"tokens": len(gaps), "max_abs": max(gaps), "mean_abs": statistics.fmean(gaps)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--rollouts", default="16,64")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--eos-id", type=int, default=2)
    parser.add_argument("--vocab-cap", type=int, default=49152, help="cap on the vocabulary (smaller: faster CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gap-rows", type=int, default=8, help="rows compared for the log-prob gap")
    parser.add_argument("--pretrained", type=Path, help="a model directory with its tokenizer instead of --models")
    parser.add_argument("--prompts", type=Path, help="with --pretrained: a prepared split's jsonl (its prompts)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "rollout_engines.json")
    args = parser.parse_args(argv)

    results = read_json(args.results) if args.results.is_file() else {}
    results.setdefault("system", {**cpu_description(), "device": args.device})
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # a stage's model directory is named "model": its stage names it (sft/model -> sft-model)
    named = "-".join(args.pretrained.parts[-2:]) if args.pretrained and args.pretrained.name == "model" else None
    for name in [named or args.pretrained.name] if args.pretrained else args.models.split(","):
        if not args.pretrained:
            model, vocab = build(name, args.device, args.vocab_cap)
            tokenizer = _Tokenizer(args.eos_id)
        for rollout in (int(r) for r in args.rollouts.split(",")):
            if args.pretrained:
                model, tokenizer, ids, mask = pretrained(args.pretrained, args.prompts, rollout, args.device)
            else:
                ids, mask = prompts(rollout, args.prompt_tokens, vocab)
            ids, mask = ids.to(args.device), mask.to(args.device)
            key = f"{name}/rollout_{rollout}"
            entry = results.setdefault(key, {})
            for engine in ENGINES:
                if engine not in entry:
                    entry[engine] = measure(engine, model, tokenizer, ids, mask, args)
                    atomic_write_json(args.results, results)
                print(key, engine, {k: v for k, v in entry[engine].items() if k != "runs"}, flush=True)
            entry["continuous_vs_generate"] = round(entry["continuous"]["tokens_per_s"]
                                                    / entry["generate"]["tokens_per_s"], 3)  # fmt: skip
            if "logprob_gap" not in entry:
                entry["logprob_gap"] = logprob_gap(model, tokenizer, ids, mask, args)
            atomic_write_json(args.results, results)
            print(key, "continuous/generate", entry["continuous_vs_generate"], "gap", entry["logprob_gap"])
        del model
    return results


if __name__ == "__main__":
    main()

"""Peak memory and time of one scoring forward's log-prob terms: whole-batch float32 against chunks.

    .venv/bin/python bench/scoring_memory.py                     # SmolLM2-135M shape, random weights, fp32 + bf16
    .venv/bin/python bench/scoring_memory.py --rows 8 --prompt 32 --response 32 --layers 2   # smoke run

PPO scoring turns each forward's ``(rows, width, vocabulary)`` logits into log-probs at the sampling temperature,
log-probs at temperature 1 (perplexity) and the entropy. Before, the logits were promoted to float32 as a whole and
each term built its own whole-batch temporaries (the temperature-scaled copy, the log-sum-exp, the softmax). Now
``algos.ppo.logprob_terms`` takes them a chunk of ``ppo.logprob_chunk_tokens`` positions at a time from logits
left in the model's dtype. Each mode runs in a fresh process on a Llama of SmolLM2-135M's shape (vocabulary
49,152) with random weights; the peak resident set is read from the kernel (``VmHWM``, reset with
``/proc/self/clear_refs`` just before the forward), so it counts the forward, the logits and every temporary.
Writes ``bench/results/scoring_memory.json`` after every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description  # noqa: E402

MODES = ("whole", "chunked")


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args) -> dict:
    """One mode in this process: build the model and batch, reset the peak, score once, report."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core.algos import ppo as algo
    from rlhf_core.models.causal_lm import response_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (args.rows, args.prompt + args.response))
    mask = torch.ones_like(ids)
    tokens = ids[:, args.prompt :]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad(), autocast:
        response_logits(model, ids[:1], mask[:1], args.prompt, args.response)  # warm-up: kernels and caches
        Path("/proc/self/clear_refs").write_text("5")
        base = _peak_rss_kib()
        started = time.perf_counter()
        logits = response_logits(model, ids, mask, args.prompt, args.response)
        if args.mode == "whole":  # the former scoring: float32 logits, each term over the whole batch
            terms = algo.logprob_terms(logits.float(), tokens, 0.8, chunk_positions=10**12)
        else:
            terms = algo.logprob_terms(logits, tokens, 0.8, chunk_positions=args.chunk)
        seconds = time.perf_counter() - started
    return {
        "mode": args.mode,
        "bf16": args.bf16,
        "peak_above_start_mib": (_peak_rss_kib() - base) / 1024,
        "seconds": seconds,
        "logits_mib": logits.numel() * logits.element_size() / 2**20,
        "checksum": float(sum(t.double().sum() for t in terms)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30")
    parser.add_argument("--chunk", type=int, default=4096, help="ppo.logprob_chunk_tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "scoring_memory.json")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    shape = ["--rows", args.rows, "--prompt", args.prompt, "--response", args.response, "--vocab", args.vocab,
             "--layers", args.layers, "--chunk", args.chunk]  # fmt: skip
    out = {"settings": {k: v for k, v in vars(args).items() if k not in ("mode", "bf16", "results")},
           "cpu": cpu_description(), "runs": []}  # fmt: skip
    for repeat in range(args.repeats):
        for bf16 in (False, True):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:  # alternate which mode goes first
                command = [sys.executable, __file__, "--mode", mode, *map(str, shape), *(["--bf16"] if bf16 else [])]
                run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                out["runs"].append(run)
                print(f"{'bf16' if bf16 else 'fp32'} {mode:8s} peak +{run['peak_above_start_mib']:8.0f} MiB "
                      f"{run['seconds']:6.2f} s  (logits {run['logits_mib']:.0f} MiB)", flush=True)  # fmt: skip
                args.results.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.results.with_suffix(".tmp")
                tmp.write_text(json.dumps(out, indent=1))
                tmp.replace(args.results)
    print(summary(out["runs"]))


def summary(runs: list[dict]) -> str:
    lines = ["| precision | mode | peak above start (MiB, min) | seconds (min) |", "| --- | --- | --- | --- |"]
    for bf16 in (False, True):
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["bf16"] == bf16]
            if mine:
                lines.append(f"| {'bf16 autocast' if bf16 else 'fp32'} | {mode} | "
                             f"{min(r['peak_above_start_mib'] for r in mine):,.0f} | "
                             f"{min(r['seconds'] for r in mine):.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""What makes a 135 M model practical on a 2-core CPU: each speed option timed on SmolLM2-135M-Instruct, in one run.

    .venv/bin/python bench/real_model_options.py                 # after `rlhf models pull smollm2-135m-instruct`
    .venv/bin/python bench/real_model_options.py --repeats 1     # smoke run

Training: one forward + backward of a micro-batch shaped like the simulated domain's SFT batches under the
model's chat template (``--batch`` rows of ``--prompt`` + ``--response`` tokens; labels on the response only),
for each option:

- ``fp32 full logits``: the SFT stage as it was, the LM head on every position;
- ``fp32 response logits``: the LM head on the positions that predict a response token (``logits_to_keep``);
- ``bf16 autocast``: the same under ``torch.autocast(cpu, bfloat16)`` (the engine's ``distributed.bf16``);
- ``gradient checkpointing``: layer activations recomputed in the backward pass;
- ``LoRA r16``: peft adapters on every projection (the project's ``model.lora`` defaults), base frozen;
- ``LoRA r16 + bf16``.

Generation: ``sample`` (transformers' ``generate`` with a KV cache) of ``--gen-tokens`` tokens for ``--batch``
prompts, fp32 and under bf16 autocast, EOS disabled so every run makes the same number of tokens.

Variants alternate within each repeat (so a drift in machine load hits all of them), after one warm-up each.
Writes ``bench/results/real_model_options.json`` (atomically, after every repeat: rerunning resumes) with the
CPU's model name and flags, and prints a table of the median seconds and the speed-up over the first option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RESULTS = REPO / "bench" / "results" / "real_model_options.json"
TRAIN_VARIANTS = ("fp32 full logits", "fp32 response logits", "bf16 autocast", "gradient checkpointing",
                  "LoRA r16", "LoRA r16 + bf16")  # fmt: skip
GEN_VARIANTS = ("generate fp32", "generate bf16 autocast")


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
    return info


def run_stage_process(stage: str, sets: list[str], cwd: Path, log_path: Path, params: Path | None = None) -> float:
    """``rlhf <stage>`` with ``--set`` overrides in a fresh offline process run from ``cwd`` (its own checkout's code),
    its output into ``log_path``; returns the process's peak resident set size in GiB (``wait4``), raises when the
    stage fails (the log says why)."""
    import subprocess

    command = [sys.executable, "-m", "rlhf_core.cli", stage, *(["--params", str(params)] if params else []),
               *(x for s in sets for x in ("--set", s))]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, command)
    return usage.ru_maxrss / 1024**2  # KiB on Linux


def read_train_csv(out: Path) -> list[dict]:
    """A stage's per-step history as its ``plots/train.csv`` holds it."""
    import csv

    with open(out / "plots" / "train.csv") as handle:
        return list(csv.DictReader(handle))


def _batch(batch: int, prompt: int, response: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, vocab, (batch, prompt + response), generator=gen)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return input_ids, torch.ones_like(input_ids), labels


def _train_step(model, input_ids, mask, labels, prompt: int, keep_response_only: bool, bf16: bool) -> None:
    import torch

    from rlhf_core.algos.sft import sft_loss

    keep = input_ids.shape[1] - prompt + 1 if keep_response_only else 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
    loss, _ = sft_loss(logits, labels[:, labels.shape[1] - logits.shape[1] :])
    loss.backward()
    model.zero_grad(set_to_none=True)


def _models(path: Path):
    """The variants' models: the full model (also used with checkpointing toggled) and a LoRA copy."""
    import copy

    from rlhf_core.config import LoraConfig
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.lora import apply_lora

    full = load_causal_lm(path).train()
    lora = apply_lora(copy.deepcopy(full), LoraConfig(enabled=True)).train()
    return full, lora


def _time_train(variant: str, full, lora, batch, prompt: int) -> float:
    model = lora if variant.startswith("LoRA") else full
    if variant == "gradient checkpointing":
        full.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = time.perf_counter()
    _train_step(model, *batch, prompt, keep_response_only=variant != "fp32 full logits", bf16="bf16" in variant)
    seconds = time.perf_counter() - start
    if variant == "gradient checkpointing":
        full.gradient_checkpointing_disable()
    return seconds


def _time_generate(variant: str, model, tokenizer, queries, mask, tokens: int) -> float:
    import types

    import torch

    from rlhf_core.models.generation import sample

    no_eos = types.SimpleNamespace(eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    model.eval()
    start = time.perf_counter()
    with autocast:
        out = sample(model, no_eos, queries, mask, None, tokens)
    seconds = time.perf_counter() - start
    model.train()
    assert out.shape[1] == tokens, out.shape
    return seconds


def _summary(results: dict) -> list[dict]:
    rows = []
    for group in (TRAIN_VARIANTS, GEN_VARIANTS):
        base = None
        for variant in group:
            times = results["seconds"].get(variant, [])
            if not times:
                continue
            median = statistics.median(times)
            base = base or median
            rows.append({"variant": variant, "median_s": round(median, 3), "runs": len(times),
                         "speedup": round(base / median, 2)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="store name or model directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=48, help="prompt tokens (sim data under the chat template)")
    parser.add_argument("--response", type=int, default=24, help="response tokens")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)

    import torch

    from rlhf_core.io import atomic_write_json
    from rlhf_core.models.store import resolve
    from rlhf_core.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    path = Path(resolve(args.model, str(REPO / "models")))
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "repeats")}
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "seconds": {}}
    results.update(cpu=cpu_description(), torch=torch.__version__, threads=torch.get_num_threads())
    tokenizer = load_tokenizer(str(path))
    full, lora = _models(path)
    batch = _batch(args.batch, args.prompt, args.response, full.config.vocab_size)
    queries, qmask = batch[0][:, : args.prompt], batch[1][:, : args.prompt]

    for variant in TRAIN_VARIANTS:  # warm-up: first-call allocations and oneDNN kernel selection
        _time_train(variant, full, lora, batch, args.prompt)
    for variant in GEN_VARIANTS:
        _time_generate(variant, full, tokenizer, queries, qmask, 4)
    done = min((len(results["seconds"].get(v, [])) for v in TRAIN_VARIANTS + GEN_VARIANTS), default=0)
    for repeat in range(done, args.repeats):
        for variant in TRAIN_VARIANTS:
            results["seconds"].setdefault(variant, []).append(_time_train(variant, full, lora, batch, args.prompt))
        for variant in GEN_VARIANTS:
            seconds = _time_generate(variant, full, tokenizer, queries, qmask, args.gen_tokens)
            results["seconds"].setdefault(variant, []).append(seconds)
        results["summary"] = _summary(results)
        atomic_write_json(args.results, results)
        print(f"repeat {repeat + 1}/{args.repeats} written to {args.results}", flush=True)
    for row in results.get("summary", _summary(results)):
        print(f"{row['variant']:<26} {row['median_s']:>8.3f} s  x{row['speedup']:<5} ({row['runs']} runs)")


if __name__ == "__main__":
    main()

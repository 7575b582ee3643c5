"""The GPU path, run for real: every stage on the device, ZeRO-2/3 with NCCL, and PPO at realistic sizes.

    python3 bench/gpu_check.py --device cuda                      # on one GPU: about 6-8 minutes on an H200
    .venv/bin/python bench/gpu_check.py --device cpu --tiny       # the same code at tiny sizes, on the CPU (a test)
    .venv/bin/python bench/gpu_check.py --device cpu --parts pipeline,zero \\
        --results bench/results/gpu_check_cpu.json                # the CPU reference the GPU run is compared with

Three parts, each timed stage by stage, its final metrics kept:

1. ``pipeline``: the six stages (prepare, SFT, RM, rm-eval, PPO, eval) through the stage scaffold with the torch
   engine, at the default parameters with the training steps capped (``--sft-steps``, ``--rm-steps``,
   ``--ppo-steps``) so the whole check fits a short device lease;
2. ``zero``: SFT and PPO again under DeepSpeed ZeRO-2 and ZeRO-3 in one process (NCCL on a GPU, gloo on a CPU),
   from the same data, SFT policy and reward model, next to the torch engine at the same settings;
3. ``scale``: PPO iterations in bf16 with randomly initialised weights at realistic sizes (the SmolLM2-135M Llama
   configuration and a Llama of about 1 B parameters), prompt 256 / response 256 tokens: generation tokens/s (our
   sampler, which is transformers' ``generate`` with the paper's sampling, against a plain ``generate``), the
   policy and critic update's tokens/s and model FLOP utilisation against the device's bf16 peak, scoring time,
   peak device memory, seconds per iteration and how they split.

With ``--cpu-reference FILE`` (a ``--device cpu`` run of the same parts and settings) each stage's metrics are
put next to the CPU's, with the largest relative difference. Results go to ``--results`` (default
``bench/results/gpu_check.json``), written after every part, and a table is printed.

Nothing here needs MLflow, Prefect or DVC: stages run with tracking off (the null logger). The GPU machine has
torch, transformers, peft and the rest; pydantic and DeepSpeed travel as wheels (``bench/gpu_wheels.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The H200's dense bf16 peak (NVIDIA's datasheet, SXM: 989 TFLOP/s); measured here, an 8192^3 bf16 matmul in
# PyTorch reaches about 790 (.library/device/KINDS.md). MFU is reported against the datasheet number.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# Randomly initialised Llamas of realistic size. The 1 B one keeps SmolLM2's vocabulary so one tokenizer serves both.
SCALE_MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=True),
}  # fmt: skip
# Headline metrics compared between devices and engines (whichever the stage writes).
COMPARED = {
    "prepare": [],
    "sft": ["sft/val_loss", "sft/ppl"],
    "rm": ["rm/val_accuracy", "rm/reward_mean", "rm/reward_std"],
    "rm-eval": ["rm_eval/accuracy", "rm_eval/gold_accuracy"],
    "ppo": ["ppo/objective_scores", "ppo/objective_kl", "ppo/rollout_response_length"],
    "eval": ["eval/gold/win_rate", "eval/rm/win_rate"],
}


# ------------------------------------------------------------------------------------------------ helpers
def device_description(device: str) -> dict:
    import torch

    from bench.real_model_options import cpu_description

    info = {"device": device, "cpu": cpu_description(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "deepspeed": _version("deepspeed"),
            "pydantic": _version("pydantic"), "peft": _version("peft")}  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))  # fmt: skip
    return info


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def peak_flops(info: dict) -> float | None:
    gpu = info.get("gpu", "")
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)


@contextlib.contextmanager
def measured(device: str):
    """Wall time and peak device memory (GiB; None on the CPU) of the block: ``with measured(d) as m: ...``."""
    import torch

    out: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield out
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["seconds"] = round(time.perf_counter() - started, 2)


@contextlib.contextmanager
def scoring_peak(device: str):
    """Peak device memory (GiB) of each scoring phase inside the block, appended to the yielded list (empty on
    the CPU): the trainer's ``score`` wrapped for the block's duration."""
    import torch

    from rlhf_core.trainers.ppo import iteration

    peaks: list[float] = []
    real_score = iteration.score

    def score(*args, **kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = real_score(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
        return out

    iteration.score = score
    try:
        yield peaks
    finally:
        iteration.score = real_score


def write(results: dict, path: Path) -> None:
    from rlhf_core.io import atomic_write_json

    atomic_write_json(path, results)


def stage_config(root: Path, overrides: list[str]):
    from rlhf_core.config import PathsConfig, load_config

    paths = [f"paths.{p}={root / p}" for p in PathsConfig.model_fields]
    return load_config(REPO / "params.yaml", [*overrides, *paths, "tracking.enabled=false"])


def run_one(stage: str, config, device: str) -> dict:
    """One stage through the scaffold: seconds, peak device memory and its compared metrics."""
    from rlhf_core import distributed
    from rlhf_core.pipeline import run_stage

    try:
        with measured(device) as cost:
            outcome = run_stage(stage, config)
    finally:
        distributed.shutdown()
    metrics = {k: outcome.metrics[k] for k in COMPARED[stage] if k in outcome.metrics}
    return {**cost, "metrics": metrics}


# ------------------------------------------------------------------------------------------------ the parts
def pipeline_overrides(args) -> list[str]:
    if args.tiny:
        from tests.conftest import TINY

        return list(TINY)
    return [f"sft.max_steps={args.sft_steps}", f"rm.max_steps={args.rm_steps}", f"ppo.steps={args.ppo_steps}"]


def part_pipeline(args, work: Path) -> dict:
    """Every stage with the torch engine, in pipeline order."""
    from rlhf_core.pipeline import STAGES

    config = stage_config(work, pipeline_overrides(args))
    return {stage: run_one(stage, config, args.device) for stage in STAGES}


def part_zero(args, work: Path) -> dict:
    """SFT and PPO under the torch engine and ZeRO-2/3 (one process) at short settings, from the pipeline's data,
    SFT policy and reward model (SFT writes elsewhere, so PPO starts from the same policy every time)."""
    steps = (8, 2) if args.tiny else (args.zero_sft_steps, args.zero_ppo_steps)
    short = [f"sft.max_steps={steps[0]}", f"ppo.steps={steps[1]}", "ppo.critic_warmup_steps=1"]  # policy updates too
    if args.tiny:  # short answers: under ZeRO-3 each generated token gathers every layer, slow on a CPU
        short.append("data.max_response_tokens=16")
    engines = {
        "torch": ["distributed.engine=torch"],
        "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
        "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3"],
    }
    small_buckets = ["distributed.reduce_bucket_size=50000000"]  # 200 MB of fp32 instead of 2 GB per bucket
    results: dict = {}
    for name, engine in engines.items():
        config = stage_config(work, [*pipeline_overrides(args), *short, *engine, *small_buckets])
        results[name] = {
            "sft": _kept_going(run_one, "sft", _with_path(config, "sft", work / f"sft_{name}"), args.device),
            "ppo": _kept_going(run_one, "ppo", _with_path(config, "ppo", work / f"ppo_{name}"), args.device),
        }
    return results


def _with_path(config, stage: str, path: Path):
    """``config`` with one stage writing to ``path`` (the stages it reads stay the pipeline's)."""
    return config.model_copy(update={"paths": config.paths.model_copy(update={stage: str(path)})})


def part_scale(args, work: Path) -> dict:
    names = ["tiny"] if args.tiny else [n for n in args.scale_models.split(",") if n]
    return {name: _kept_going(scale_run, args, work / f"scale_{name}", name) for name in names}


def scale_run(args, root: Path, name: str) -> dict:
    """PPO iterations at ``name``'s size with random weights: the phases of each iteration, generation against a
    plain ``generate``, update throughput and MFU, peak memory."""
    import torch

    from rlhf_core import distributed
    from rlhf_core.trainers.ppo.iteration import ppo_iteration, start_run

    prompt, response = (16, 16) if args.tiny else (args.prompt_tokens, args.response_tokens)
    rollout = 8 if args.tiny else args.scale_rollout
    params = _write_random_models(root, SCALE_MODELS[name], prompt, rollout)
    overrides = [
        "distributed.bf16=true", "ppo.tricks.ptx=false", "ppo.critic_warmup_steps=0",
        f"ppo.rollout_size={rollout}", f"ppo.minibatch_size={rollout // 2}",
        f"ppo.micro_batch_size={min(rollout // 2, args.scale_micro_batch)}",
        f"ppo.forward_batch_size={min(rollout, args.scale_forward_batch)}",
        f"ppo.max_tokens_per_micro_batch={_budget(args.scale_micro_tokens)}",
        f"ppo.max_tokens_per_forward={_budget(args.scale_forward_tokens)}",
        f"ppo.steps={args.scale_iterations + 1}", f"data.max_prompt_tokens={prompt + 32}",
        f"data.max_response_tokens={response}", f"model.max_position_embeddings={prompt + 32 + response}",
        f"generation.engine={args.scale_engine}", *args.scale_set,
    ]  # fmt: skip
    config = stage_config(root, overrides)
    ctx = distributed.setup(config.distributed)
    records = []
    with (
        distributed.stage_autocast(config.distributed),
        measured(args.device) as cost,
        scoring_peak(args.device) as peaks,
    ):
        run = start_run(config, ctx, root / "checkpoints", gold_judge=False)
        for iteration in range(args.scale_iterations + 1):  # the first warms up (allocator, kernels) and is left out
            record, exp = ppo_iteration(run, iteration)
            if iteration:
                numbers = _iteration_numbers(record, exp, params, args, ctx.device)
                records.append({**numbers, **({"scoring_peak_gib": peaks[-1]} if peaks else {})})
        plain = _plain_generate(run, exp, response)
    distributed.shutdown()
    result = {"parameters": params, "prompt_tokens": prompt, "response_tokens": response, "rollout": rollout,
              "generation_engine": config.generation.engine, "overrides": list(args.scale_set),
              "max_tokens_per_micro_batch": config.ppo.max_tokens_per_micro_batch,
              "max_tokens_per_forward": config.ppo.max_tokens_per_forward,
              "iterations": records, **_means(records), "plain_generate": plain,
              "peak_memory_gib": cost.get("peak_memory_gib")}  # fmt: skip
    if records:
        result["sampler_vs_plain_generate"] = round(result["generation_tokens_per_s"] / plain["tokens_per_s"], 3)
    del run
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _budget(tokens: int) -> str:
    """A token budget setting: 0 means null (the fixed-size micro-batches and forwards)."""
    return "null" if tokens == 0 else str(tokens)


def _write_random_models(root: Path, model_kwargs: dict, prompt_tokens: int, rollout: int) -> int:
    """A data directory (tokenizer, prompts of about ``prompt_tokens`` tokens) and random policy and reward model
    directories where the PPO stage looks for them; returns the policy's parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_core.data.tokenize import encode_query
    from rlhf_core.io import atomic_write_jsonl
    from rlhf_core.models.tokenizer import train_bpe_tokenizer

    words = [f"w{i}" for i in range(400)]
    long = [" ".join(words[(i * 7 + j) % len(words)] for j in range(2 * prompt_tokens)) for i in range(4 * rollout)]
    tokenizer = train_bpe_tokenizer(long, vocab_size=min(1024, model_kwargs["vocab_size"]))
    # Cut each text so that the query the PPO stage builds from it (chat template included) is prompt_tokens long.
    overhead = len(encode_query(tokenizer, "x")) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    keep = max(prompt_tokens - overhead, 1)
    texts = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:keep]).strip() for t in long]
    splits = root / "data" / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(splits / "ppo.jsonl", [{"prompt": t} for t in texts])
    tokenizer.save_pretrained(root / "data" / "tokenizer")
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    config = LlamaConfig(**model_kwargs, **ids)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    count = sum(p.numel() for p in policy.parameters())
    policy.to(torch.bfloat16).save_pretrained(root / "sft" / "model")  # loaded back as fp32; half the disk
    tokenizer.save_pretrained(root / "sft" / "model")
    del policy
    reward = LlamaForSequenceClassification(LlamaConfig(**model_kwargs, **ids, num_labels=1))
    reward.to(torch.bfloat16).save_pretrained(root / "rm" / "model")
    tokenizer.save_pretrained(root / "rm" / "model")
    return count


def _iteration_numbers(record: dict, exp, params: int, args, device) -> dict:
    """One iteration's phases, token counts and throughputs."""
    sequences, width = exp.query_responses.shape
    generated = int(exp.response_mask.sum())
    real_tokens = sum(exp.query_lengths) + sum(exp.response_lengths)
    # The policy and the critic (same size: it starts from the reward model) each take a forward and a backward
    # over every position their micro-batches compute, per epoch: about 6 x parameters FLOPs per position each.
    trained_tokens = round(record["batch/update_positions_per_token"] * real_tokens) * args.epochs
    update_flops = 2 * 6 * params * trained_tokens
    seconds = {k.removeprefix("time/"): record[k] for k in ("time/generation", "time/scoring", "time/training")}
    return {
        **seconds,
        "iteration_seconds": round(sum(seconds.values()), 3),
        "generated_tokens": generated,
        "padded_sequence_tokens": sequences * width,
        "real_tokens": real_tokens,
        **{k.removeprefix("batch/"): round(v, 3) for k, v in record.items() if k.startswith("batch/")},
        "generation_tokens_per_s": generated / seconds["generation"],
        "update_tokens_per_s": trained_tokens / seconds["training"],
        "update_tflops": update_flops / seconds["training"] / 1e12,
    }


def _means(records: list[dict]) -> dict:
    if not records:
        return {}
    keys = [k for k in records[0] if isinstance(records[0][k], (int, float))]
    return {k: round(sum(r[k] for r in records) / len(records), 3) for k in keys}


def _plain_generate(run, exp, response_tokens: int) -> dict:
    """transformers' ``generate`` alone (sampling, no top-p, no repetition penalty, every response its full length)
    on the last rollout's queries: what the sampler's processors and bookkeeping cost on top."""
    import torch

    policy = run.models.policy.unwrapped()
    queries = exp.queries
    query_mask = exp.attention_mask[:, : queries.shape[1]]
    timings = []
    for _ in range(2):
        if queries.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = policy.generate(input_ids=queries, attention_mask=query_mask, do_sample=True, top_k=0,
                              max_new_tokens=response_tokens, min_new_tokens=response_tokens,
                              pad_token_id=run.tokenizer.pad_token_id)  # fmt: skip
        if queries.is_cuda:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    tokens = (out.shape[1] - queries.shape[1]) * out.shape[0]
    return {"seconds": round(min(timings), 3), "tokens": tokens, "tokens_per_s": round(tokens / min(timings), 1)}


# ------------------------------------------------------------------------------------------------ report
def compare_with(results: dict, reference: dict) -> dict:
    """Largest relative difference of each stage's metrics against the reference run's."""
    out: dict = {}
    for part in ("pipeline", "zero"):
        ours, theirs = results.get(part), reference.get(part)
        if not ours or not theirs:
            continue
        for path, here, there in _paired_metrics(ours, theirs):
            out.setdefault(part, {})[path] = {"here": here, "reference": there, "relative": _relative(here, there)}
    return out


def _paired_metrics(ours: dict, theirs: dict, prefix: str = ""):
    for key, value in ours.items():
        if key == "metrics":
            for name, here in value.items():
                if name in theirs.get("metrics", {}):
                    yield f"{prefix}{name}", here, theirs["metrics"][name]
        elif isinstance(value, dict) and isinstance(theirs.get(key), dict):
            yield from _paired_metrics(value, theirs[key], f"{prefix}{key}/")


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12) if math.isfinite(a) and math.isfinite(b) else float("inf")


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check on {results['system'].get('gpu') or results['system']['cpu'].get('model')}")
    for column in ("part", "what", "seconds", "peak GiB", "numbers"):
        table.add_column(column, overflow="fold")
    for part, what, got in _table_entries(results):
        if "error" in got:
            table.add_row(part, what, "", "", f"FAILED: {got['error']}")
        elif part == "scale":
            table.add_row(part, what, "", str(got.get("peak_memory_gib", "")), _scale_numbers(got))
        else:
            table.add_row(part, what, str(got["seconds"]), str(got.get("peak_memory_gib", "")), _short(got["metrics"]))
    for part, rows in results.get("vs_reference", {}).items():
        worst = max(rows.items(), key=lambda kv: kv[1]["relative"])
        table.add_row("vs reference", part, "", "", f"{len(rows)} metrics; largest relative difference "
                      f"{worst[1]['relative']:.2e} ({worst[0]})")  # fmt: skip
    Console().print(table)


def _table_entries(results: dict):
    """(part, what, result) for every row of the table; a part that failed as a whole is one row."""
    for part in ("pipeline", "zero", "scale"):
        got = results.get(part, {})
        if "error" in got:
            yield part, "", got
        elif part == "zero":
            for engine, stages in got.items():
                for stage, one in stages.items():
                    yield part, f"{engine} {stage}", one
        else:
            for what, one in got.items():
                yield part, what, one


def _scale_numbers(got: dict) -> str:
    return (
        f"{got['parameters'] / 1e6:.0f} M params; s/it {got.get('iteration_seconds')} (gen "
        f"{got.get('generation')}, score {got.get('scoring')}, train {got.get('training')}); gen "
        f"{got.get('generation_tokens_per_s', 0):.0f} tok/s vs plain generate "
        f"{got['plain_generate']['tokens_per_s']:.0f}; "
        f"update {got.get('update_tokens_per_s', 0):.0f} tok/s, "
        f"{got.get('update_tflops', 0):.1f} TFLOP/s" + (f", MFU {got['mfu']:.1%}" if "mfu" in got else "")
    )


def _short(metrics: dict) -> str:
    return ", ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (the CPU test)")
    parser.add_argument("--parts", default="pipeline,zero,scale")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    parser.add_argument("--cpu-reference", type=Path, help="a --device cpu results file of the same settings")
    parser.add_argument("--workdir", type=Path, help="where stage outputs go (default: a temporary directory)")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--rm-steps", type=int, default=200)
    parser.add_argument("--ppo-steps", type=int, default=20)
    parser.add_argument("--zero-sft-steps", type=int, default=50)
    parser.add_argument("--zero-ppo-steps", type=int, default=4)
    parser.add_argument("--scale-models", default="smollm2-135m,llama-1b")
    parser.add_argument("--scale-iterations", type=int, default=2)
    parser.add_argument("--scale-rollout", type=int, default=64)
    parser.add_argument("--scale-micro-batch", type=int, default=8)
    parser.add_argument("--scale-forward-batch", type=int, default=64, help="sequences per scoring forward")
    parser.add_argument(
        "--scale-micro-tokens",
        type=int,
        default=16_384,
        help="ppo.max_tokens_per_micro_batch at scale; 0: fixed-size micro-batches (before issue 24)",
    )
    parser.add_argument(
        "--scale-forward-tokens",
        type=int,
        default=32_768,
        help="ppo.max_tokens_per_forward at scale; 0: fixed-size scoring forwards",
    )
    parser.add_argument(
        "--scale-engine",
        choices=["auto", "generate", "continuous"],
        default="auto",
        help="generation.engine at scale (the rollout engine; issue 25)",
    )
    parser.add_argument(
        "--scale-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another config override at scale, e.g. distributed.engine=deepspeed (bf16 weights for the continuous "
        "engine, whose thread decodes in the weights' dtype)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)  # ppo.epochs of the default
    return parser.parse_args(argv)


def _kept_going(function, *args):
    """``function(*args)``, or the error it raised as a result: one device lease is too short to lose the later
    parts (or the other engines and models) to an early failure, so the check records it and goes on."""
    import traceback

    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - recorded in the results and printed, then the check goes on
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}", "where": args[-1]}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the same code, with the GPU hidden
    import torch

    from rlhf_core.env import apply_defaults

    apply_defaults()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU")
    parts = [p for p in args.parts.split(",") if p]
    results: dict = {"command": " ".join(sys.argv), "system": device_description(args.device), "settings": vars(args)}
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in results["settings"].items()}
    results["system"]["peak_bf16_flops"] = peak_flops(results["system"])
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        work = args.workdir or Path(scratch)
        for part, run in (("pipeline", part_pipeline), ("zero", part_zero), ("scale", part_scale)):
            if part not in parts:
                continue
            if part == "zero" and "pipeline" not in parts:
                part_pipeline(args, work)  # the data, SFT policy and reward model it starts from
            results[part] = _kept_going(run, args, work)
            write(results, args.results)
    peak = results["system"]["peak_bf16_flops"]
    for got in results.get("scale", {}).values():
        if peak and "update_tflops" in got:
            got["mfu"] = round(got["update_tflops"] * 1e12 / peak, 4)
    if args.cpu_reference:
        results["vs_reference"] = compare_with(results, json.loads(args.cpu_reference.read_text()))
    write(results, args.results)
    print_table(results)
    return results


if __name__ == "__main__":
    main()

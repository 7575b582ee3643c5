"""Scaling with DeepSpeed ZeRO on CPU: stages 0-3 x 1 and 2 processes, step time, per-process memory, losses.

    .venv/bin/python bench/zero_scaling.py           # 33 M parameters, 8 configurations, ~8 min on 2 idle cores
    .venv/bin/python bench/zero_scaling.py --hidden 128 --layers 2 --heads 4 --seq-len 64 --steps 3 \
        --warmup 0 --results outputs/bench/zero_scaling/smoke.json            # smoke test, a few minutes

For every (ZeRO stage, process count) the benchmark launches ``torchrun --nproc_per_node N`` (as
``python -m torch.distributed.run``, on a free port: ``--master_port 0`` hangs) on this same file with
``--worker``. The worker builds a small Llama from a config with the same seed everywhere and trains it for
``--steps`` optimizer steps through the project's own engine (:func:`rlhf_core.distributed.make_engine`,
``engine=deepspeed``, gloo, fp32, no offload, the torch AdamW client optimizer, so DeepSpeed compiles nothing).
Every step uses the same synthetic global batch in every configuration: with N processes each rank takes 1/N of
it, and gradient accumulation makes up the rest (``micro_batch = global_batch / max(nproc)``), so the loss curves
must agree up to float summation order (the reduction only halves and adds: they usually agree to the bit).

Per configuration it records:

- the median step time: forward + backward + optimizer step over the whole global batch, on the slowest rank,
  leaving out the first ``--warmup`` steps and the step the memory census runs on (its hooks cost time);
- the loss per step (mean over the global batch) and its largest relative difference from ZeRO-0 on 1 process;
- per-process memory of model states on the second step, found by walking the tensors this rank holds and
  counting each byte of an underlying storage once: **params** (the module's parameters; under ZeRO-3 the
  ``ds_tensor`` shards, plus a whole copy of the parameters under ``stage3_param_persistence_threshold``), the
  **fp32 master** shard that ZeRO 1-3 keep for the optimizer even though the model is already fp32
  (``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``), **grads** held after the last
  backward of the step (``param.grad``, ``param.grad_accum`` and the ZeRO optimizer's gradient buffers:
  ``averaged_gradients``, ``all_grad_tensors``, ``grad_partitions_flat_buffer``, the reduce buckets, ...) and
  their **peak** anywhere in the step (a hook after every gradient accumulation), and **Adam** state
  (``exp_avg``/``exp_avg_sq``: under ZeRO 1-3 only this rank's shard); plus the process's peak RSS. Allocated
  bytes no tensor refers to are reported as idle: ZeRO-2/3's gradient reduce bucket is ``reduce_bucket_size``
  elements (5e8: 1.9 GB in fp32) whatever the model size, but on CPU its untouched pages are never resident;
- the textbook expectation for fp32 + Adam, P parameters, N ranks (bytes per parameter: params 4, grads 4,
  Adam 8, and a 4-byte fp32 master under ZeRO 1-3; stage 1 shards master and Adam by N, stage 2 also the
  grads, stage 3 also the params), next to the measurement.

Reading it: DeepSpeed's stage 1 also keeps only its gradient shard once backward ends (held < textbook), but the
full gradients exist during backward (the peak); with the default 5e8-element reduce bucket, stages 2-3 do not
lower that peak either for models this small: all gradients fit in one bucket before it is reduce-scattered.

Threads: each process gets ``--threads`` (default: the machine's cores divided by the process count). Worker
logs and per-configuration JSON go to ``outputs/bench/zero_scaling``; the results to
``bench/results/zero_scaling.json``. Step times on a shared CPU are meaningless: run it on an idle machine
(oversubscribed cores slow a 2-thread process far more than two 1-thread ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = (0, 1, 2, 3)
NPROCS = (1, 2)
MB = 2**20
# Bytes per parameter in fp32 with Adam: what each stage keeps whole (divisor 1) or sharded (divisor N).
BYTES = {"params": 4, "master": 4, "grads": 4, "optimizer": 8}
CATEGORIES = ("params", "master", "grads", "optimizer")


def expected_bytes(stage: int, nproc: int, n_params: int, persistent: int = 0) -> dict[str, float]:
    """Textbook per-process model-state bytes for fp32 weights + Adam under ZeRO ``stage`` on ``nproc`` ranks.

    ``persistent``: elements of the parameters ZeRO-3 keeps whole on every rank besides their shard (those under
    ``stage3_param_persistence_threshold``, 1e5 elements by default: the norms of a model this size).
    """
    sharded = {
        0: set(),
        1: {"master", "optimizer"},
        2: {"master", "optimizer", "grads"},
        3: {"master", "optimizer", "grads", "params"},
    }[stage]
    out = {}
    for name in CATEGORIES:
        if name == "master" and stage == 0:
            out[name] = 0.0  # no ZeRO optimizer: AdamW steps the fp32 model parameters themselves
            continue
        out[name] = BYTES[name] * n_params / (nproc if name in sharded else 1)
    if stage == 3 and nproc > 1:  # with one rank the shard is the whole parameter: one copy
        out["params"] += BYTES["params"] * persistent
    return out


# ------------------------------------------------------------------------------------------------ worker
def _walk(obj, depth: int = 0):
    """Tensors inside ``obj`` (a tensor, or nested dicts/lists/tuples of them)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value, depth + 1)
    elif depth < 4 and isinstance(obj, list | tuple | set):
        for value in obj:
            yield from _walk(value, depth + 1)


def _inner_torch_optimizer(engine):
    import torch

    opt = engine.engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise RuntimeError(f"no torch optimizer inside {type(engine.engine.optimizer).__name__}")
    return opt


def _byte_span(tensor) -> tuple[int, int]:
    """[start, end) bytes of its storage that ``tensor`` refers to."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    extent = 1 + sum((dim - 1) * stride for dim, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + extent * size


class Census:
    """Bytes of model states this rank holds.

    Every byte of an underlying storage is counted once, in the first category whose tensors refer to it:
    parameters, then the fp32 master, then optimizer state, then gradients, then other ZeRO buffers. Bytes of a
    storage that no tensor refers to are ``idle``: allocated but unused, e.g. the rest of ZeRO-2/3's gradient
    reduce bucket, which is ``reduce_bucket_size`` elements (5e8 by default) however small the model (on CPU the
    untouched pages of that ``torch.empty`` are never resident, so peak RSS does not show them).
    """

    def __init__(self, engine):
        self.engine = engine
        self.torch_opt = _inner_torch_optimizer(engine)
        wrapper = engine.engine.optimizer
        self.zero_opt = wrapper if wrapper is not self.torch_opt else None

    def take(self, other: bool = True) -> dict[str, int]:
        covered: dict[int, list[tuple[int, int]]] = {}  # storage -> disjoint byte spans already counted
        allocated: dict[int, int] = {}
        out = {name: 0 for name in (*CATEGORIES, "other", "idle")}

        def add(category: str, tensors) -> None:
            for tensor in tensors:
                if tensor.numel() == 0 or tensor.is_meta:  # ZeRO keeps meta-device shape records: no memory
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                allocated[key] = storage.nbytes()
                start, end = _byte_span(tensor)
                spans = covered.setdefault(key, [])
                out[category] += (end - start) - sum(max(0, min(b, end) - max(a, start)) for a, b in spans)
                merged = []
                for a, b in sorted([*spans, (start, end)]):
                    if merged and a <= merged[-1][1]:
                        merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                    else:
                        merged.append((a, b))
                covered[key] = merged

        params = list(self.engine.module.parameters())
        # ZeRO-3 replaces param.data by an empty tensor and keeps this rank's slice in param.ds_tensor.
        add("params", [p.data for p in params])
        add("params", [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None])
        # ZeRO's fp32 partitions the torch optimizer steps (stage 3 hands them to it only inside step()); in
        # stage 0 the optimizer's params are the module's parameters, already counted.
        masters = [p for group in self.torch_opt.param_groups for p in group["params"]]
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            masters += list(_walk(getattr(self.zero_opt, name, None)))
        add("master", masters)
        add("optimizer", _walk(list(self.torch_opt.state.values())))
        grads = [p.grad for p in (*params, *masters) if p.grad is not None]
        grads += [p.grad_accum for p in params if getattr(p, "grad_accum", None) is not None]
        add("grads", grads)
        if self.zero_opt is not None:
            attrs = vars(self.zero_opt)
            add("grads", _walk([v for k, v in attrs.items() if "grad" in k.lower() or "ipg" in k.lower()]))
            if other:
                add("other", _walk([v for k, v in attrs.items() if k != "optimizer"]))
        out["idle"] = sum(allocated[key] - sum(b - a for a, b in spans) for key, spans in covered.items())
        return out


def synthetic_batch(global_batch: int, seq_len: int, vocab: int, seed: int):
    """Learnable sequences (random start and stride, mod the vocabulary), the same for every configuration and
    every step, so the loss falls steadily and any divergence between configurations shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (global_batch, 1), generator=gen)
    stride = torch.randint(1, 8, (global_batch, 1), generator=gen)
    return (start + stride * torch.arange(seq_len)) % vocab


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig, SupervisedStageConfig

    torch.set_num_threads(args.threads)
    dist_cfg = DistributedConfig(engine="deepspeed", zero_stage=args.stage, backend="gloo")
    ctx = distributed.setup(dist_cfg)
    world, rank = ctx.world_size, ctx.rank
    per_rank = args.global_batch // world
    accumulation = per_rank // args.micro_batch
    if per_rank * world != args.global_batch or accumulation * args.micro_batch != per_rank:
        raise SystemExit(f"global batch {args.global_batch} does not split into {world} x micro {args.micro_batch}")
    optim = SupervisedStageConfig(
        micro_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation, lr=args.lr, max_steps=args.steps
    )

    distributed.seed_everything(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden * 2 // 3 // 32 * 32,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    engine = distributed.make_engine(model, optim, args.steps, ctx, dist_cfg, args.micro_batch, accumulation)
    census = Census(engine)
    snapshots: dict[str, dict[str, int]] = {}
    census_step = min(1, args.steps - 1)  # the second step: Adam's state exists, buffers are warm
    stepping = {"now": -1}

    def pre_step_hook(*_):
        if stepping["now"] == census_step:  # ZeRO steps once per parameter group: keep the largest
            now, before = census.take(), snapshots.get("in_optimizer_step", {})
            snapshots["in_optimizer_step"] = {key: max(value, before.get(key, 0)) for key, value in now.items()}

    census.torch_opt.register_step_pre_hook(pre_step_hook)
    peak_in_backward = {"grads": 0, "idle": 0}

    def post_accumulate_hook(_param):
        if stepping["now"] == census_step:
            now = census.take(other=False)
            for key in peak_in_backward:
                peak_in_backward[key] = max(peak_in_backward[key], now[key])

    for param in engine.module.parameters():
        param.register_post_accumulate_grad_hook(post_accumulate_hook)

    losses, times = [], []
    tokens = synthetic_batch(args.global_batch, args.seq_len, args.vocab, args.seed)
    mine = tokens[rank * per_rank : (rank + 1) * per_rank]
    for step in range(args.steps):
        stepping["now"] = step
        distributed.barrier()
        started = time.perf_counter()
        loss_sum = torch.zeros(())
        for micro in range(accumulation):
            ids = mine[micro * args.micro_batch : (micro + 1) * args.micro_batch]
            loss = engine.forward(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if step == census_step and micro == accumulation - 1:
                snapshots["after_backward"] = census.take()
            engine.step()
        elapsed = time.perf_counter() - started
        if step == census_step:
            snapshots["after_step"] = census.take()
        # The global mean loss (every micro-batch has the same token count) and the slowest rank's time.
        losses.append(float(distributed.all_reduce_sum(loss_sum)) / (accumulation * world))
        slowest = torch.tensor([elapsed])
        if world > 1:
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        times.append(float(slowest))
        if rank == 0:
            print(f"[stage {args.stage} x{world}] step {step}: loss {losses[-1]:.6f}, {times[-1]:.2f} s", flush=True)

    measured = {
        "params": snapshots["after_step"]["params"],
        "master": snapshots["after_step"]["master"],
        "grads": snapshots["after_backward"]["grads"],
        "optimizer": snapshots["after_step"]["optimizer"],
        **{
            f"{key}_peak": max(peak, *(snapshot[key] for snapshot in snapshots.values()))
            for key, peak in peak_in_backward.items()
        },
    }
    mine_out = {
        "rank": rank,
        "memory_bytes": measured,
        "snapshots": snapshots,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # ZeRO-3 keeps parameters under stage3_param_persistence_threshold elements whole on every rank.
        "persistent_numel": sum(p.numel() for p in engine.module.parameters() if getattr(p, "ds_persist", False)),
        "param_shard_numel": sum(
            p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else p.numel()
            for p in engine.module.parameters()
        ),
    }
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, mine_out)
    else:
        gathered = [mine_out]
    if rank == 0:
        result = {
            "stage": args.stage,
            "nproc": world,
            "threads_per_process": args.threads,
            "micro_batch": args.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "n_params": n_params,
            "census_step": census_step,
            "losses": losses,
            "step_seconds": times,
            "ranks": gathered,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    distributed.shutdown()


# ------------------------------------------------------------------------------------------------ driver
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_args(args) -> list[str]:
    return [
        *("--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads)),
        *("--intermediate", str(args.intermediate), "--vocab", str(args.vocab), "--seq-len", str(args.seq_len)),
        *("--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch)),
        *("--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed)),
    ]


def launch(args, stage: int, nproc: int, out_dir: Path) -> dict:
    out = out_dir / f"stage{stage}_n{nproc}.json"
    log = out_dir / f"stage{stage}_n{nproc}.log"
    out.unlink(missing_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",  # --master_port 0 hangs with the static rendezvous
        __file__,
        "--worker",
        *("--stage", str(stage), "--threads", str(threads), "--out", str(out)),
        *model_args(args),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.time()
    with log.open("w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=REPO)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"stage {stage} x{nproc} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def summarise(result: dict, reference: list[float], warmup: int) -> dict:
    # The census step runs a memory walk in every gradient hook: never time it.
    times = [t for i, t in enumerate(result["step_seconds"]) if i >= warmup and i != result["census_step"]]
    ranks = result["ranks"]
    measured = {name: max(r["memory_bytes"][name] for r in ranks) for name in CATEGORIES}
    persistent = max(r["persistent_numel"] for r in ranks)
    expected = expected_bytes(result["stage"], result["nproc"], result["n_params"], persistent)
    rel = [abs(a - b) / abs(b) for a, b in zip(result["losses"], reference, strict=True)]
    return {
        "stage": result["stage"],
        "nproc": result["nproc"],
        "threads_per_process": result["threads_per_process"],
        "gradient_accumulation_steps": result["gradient_accumulation_steps"],
        "median_step_seconds": statistics.median(times) if times else None,
        "step_seconds": result["step_seconds"],
        "losses": result["losses"],
        "max_rel_loss_diff_vs_stage0_n1": max(rel),
        "memory_bytes_per_process": measured,
        "memory_bytes_per_process_expected": expected,
        "model_states_bytes": sum(measured.values()),
        "model_states_bytes_expected": sum(expected.values()),
        "grads_peak_bytes_per_process": max(r["memory_bytes"]["grads_peak"] for r in ranks),
        "idle_allocated_peak_bytes_per_process": max(r["memory_bytes"]["idle_peak"] for r in ranks),
        "zero3_persistent_numel": persistent,
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
        "param_shard_numel_per_rank": [r["param_shard_numel"] for r in ranks],
        "snapshots_rank0": ranks[0]["snapshots"],
        "wall_seconds": result["wall_seconds"],
    }


def print_table(rows: list[dict], n_params: int, results_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def pair(row: dict, name: str) -> str:
        got = row["memory_bytes_per_process"][name] / MB
        want = row["memory_bytes_per_process_expected"][name] / MB
        return f"{got:.1f} / {want:.1f}"

    table = Table(title=f"DeepSpeed ZeRO on CPU (gloo), {n_params / 1e6:.2f} M parameters, fp32 + AdamW")
    for column in ("ZeRO", "procs", "step s", "params", "fp32 master", "grads", "Adam", "model states"):
        table.add_column(column, justify="right")
    for column in ("grads peak", "idle buffers", "peak RSS", "max rel. loss diff"):
        table.add_column(column, justify="right")
    for row in rows:
        step = row["median_step_seconds"]
        table.add_row(
            str(row["stage"]),
            str(row["nproc"]),
            "-" if step is None else f"{step:.2f}",
            *(pair(row, name) for name in CATEGORIES),
            f"{row['model_states_bytes'] / MB:.1f} / {row['model_states_bytes_expected'] / MB:.1f}",
            f"{row['grads_peak_bytes_per_process'] / MB:.1f}",
            f"{row['idle_allocated_peak_bytes_per_process'] / MB:.0f}",
            f"{max(row['peak_rss_bytes_per_rank']) / MB:.0f}",
            f"{row['max_rel_loss_diff_vs_stage0_n1']:.1e}",
        )
    table.caption = (
        "MB per process (the largest rank), measured / textbook; grads: held after the last backward of a step; "
        "grads peak: the most held at any point of a step; idle buffers: allocated, never referenced (the "
        "unused part of ZeRO-2/3's gradient reduce bucket; not resident on CPU). "
        f"Step time: median, slowest rank. {results_path}"
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs: do not squeeze the table to 80 columns
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width; 0: about 8/3 x hidden")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all ranks")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per forward; 0: global / max(nproc)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process; 0: cores / nproc")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--nprocs", type=int, nargs="+", default=list(NPROCS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "zero_scaling")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "zero_scaling.json")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.micro_batch = args.micro_batch or args.global_batch // max(args.nprocs)
    if args.worker:
        worker(args)
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the memory census is taken on the second step)")
    if any(args.global_batch % (n * args.micro_batch) for n in args.nprocs):
        parser.error(f"--global-batch {args.global_batch} must split into nproc x micro-batch {args.micro_batch}")

    import deepspeed
    import torch
    import transformers

    from rlhf_core.env import apply_defaults
    from rlhf_core.io import atomic_write_json

    apply_defaults()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = [(stage, n) for stage in args.stages for n in sorted(args.nprocs)]
    raw = []
    for stage, nproc in configs:
        print(f"ZeRO-{stage} x {nproc} process(es) ...", flush=True)
        raw.append(launch(args, stage, nproc, args.out))
    reference = raw[0]["losses"]  # the first configuration: ZeRO-0 on 1 process by default
    rows = [summarise(result, reference, args.warmup) for result in raw]
    n_params = raw[0]["n_params"]
    results = {
        "reference": f"stage {raw[0]['stage']} x{raw[0]['nproc']}",
        "max_rel_loss_diff": max(row["max_rel_loss_diff_vs_stage0_n1"] for row in rows),
        "n_params": n_params,
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in ("worker", "stage", "out", "results", "timeout")
        },
        "cpu_count": os.cpu_count(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "expected_model": "fp32 + Adam, bytes/param: params 4, grads 4, Adam 8, fp32 master 4 (ZeRO 1-3 only); "
        "stage 1 shards master+Adam, stage 2 also grads, stage 3 also params (plus whole copies of its "
        "persistent small parameters when N > 1)",
        "configs": rows,
    }
    atomic_write_json(args.results, results)
    print_table(rows, n_params, args.results)
    print(f"max relative loss difference vs {results['reference']}: {results['max_rel_loss_diff']:.2e}")


if __name__ == "__main__":
    main()

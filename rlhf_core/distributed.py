"""The only module that knows DeepSpeed and torch.distributed.

- :func:`setup` starts (or joins) the process group and returns a :class:`DistContext` (rank, world, device);
- :func:`seed_everything` seeds python, numpy and torch the same way on every rank;
- :func:`make_engine` wraps a model + optimizer + schedule as a plain-torch loop or a DeepSpeed ZeRO engine
  behind one interface (:class:`Engine`), whose attributes also say where the two differ, so trainers never test
  an engine's type;
- :func:`make_frozen` places an inference-only model (PPO's reference and reward model): on the device, or
  sharded over the ranks under ZeRO-3;
- :func:`all_reduce_sum` sums a tensor over ranks; :func:`global_sum`, :func:`global_mean` and
  :func:`global_moments` build the global token counts, metrics and moments on it.

On CPU DeepSpeed uses gloo. Its shared-memory collective and FusedAdam are C++ ops that JIT-compile for about a
minute on each fresh machine; we switch the first off and pass a ``torch.optim.AdamW`` as the client optimizer
so nothing compiles (results are identical).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rlhf_core.config import DistributedConfig, OptimizerConfig
from rlhf_core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    engine: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend(cfg: DistributedConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(cfg: DistributedConfig) -> DistContext:
    """Join the process group started by ``torchrun`` (or start a one-process group for DeepSpeed)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and cfg.engine != "deepspeed":
        raise ConfigError(
            f"distributed.engine=torch runs in one process but WORLD_SIZE={world_size}; "
            "use --set distributed.engine=deepspeed with torchrun"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if cfg.engine == "deepspeed":
        # DeepSpeed always needs a process group, even for one process.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed = _import_deepspeed()
        if not torch.distributed.is_initialized():
            if "MASTER_ADDR" not in os.environ and world_size == 1:
                # A process alone needs no rendezvous: an in-memory store instead of torch's TCP store, which
                # would listen on every interface, unauthenticated, for the whole run. torchrun keeps its own.
                torch.distributed.init_process_group(
                    _backend(cfg), store=torch.distributed.HashStore(), rank=0, world_size=1
                )
            deepspeed.init_distributed(dist_backend=_backend(cfg), verbose=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, engine=cfg.engine)


def shutdown() -> None:
    """Destroy the process group, and DeepSpeed's cached copies of it, so a later :func:`setup` in the same
    process (tests, notebooks) starts clean instead of using a destroyed group."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in vars(groups).items():
            if name.startswith("_") and name.endswith("_GROUP") and not callable(value):
                setattr(groups, name, {} if isinstance(value, dict) else None)
    _release_zero3_modules()


def _release_zero3_modules() -> None:
    """ZeRO-3 pushes every engine's top module onto a module-level stack and never pops it, so the model, its
    engine and the gloo process group its parameters hold outlive the run. Left to interpreter exit, that group's
    worker threads are torn down in an undefined order and the process can abort ("terminate called without an
    active exception", exit -6) after all the work succeeded. Drop those references and collect now."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None and getattr(offload, "FWD_MODULE_STACK", None):
        offload.FWD_MODULE_STACK.clear()
        gc.collect()


def native_cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware as torch's oneDNN sees it (AVX-512 and later); on AVX2
    alone bf16 is emulated and slower than float32 by an order of magnitude."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_enabled(cfg: DistributedConfig) -> bool:
    """``distributed.bf16`` resolved: ``auto`` is on where bf16 is native (a CUDA GPU that has it, or
    :func:`native_cpu_bf16`), off elsewhere."""
    if cfg.bf16 != "auto":
        return bool(cfg.bf16)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return native_cpu_bf16()


_warned_slow_bf16 = False


def _warn_if_bf16_is_emulated(cfg: DistributedConfig) -> None:
    """One line per process when bf16 was asked for on a CPU that emulates it: the run is correct, only slow."""
    global _warned_slow_bf16
    if cfg.bf16 is True and not torch.cuda.is_available() and not native_cpu_bf16() and not _warned_slow_bf16:
        _warned_slow_bf16 = True
        print(f"warning: distributed.bf16=true on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}"
              "): bf16 is emulated here, measured 31x slower than float32 for a SmolLM2 training step; set "
              "distributed.bf16=auto (bf16 where it is native) or false", file=sys.stderr, flush=True)  # fmt: skip


def stage_autocast(cfg: DistributedConfig):
    """bfloat16 autocast over a whole stage when ``distributed.bf16``: sampling, scoring and evaluation run in
    the precision training does (the engines' own autocast covers training alone), so PPO's old log-probs come
    from the same arithmetic as the update's and the ratio starts at 1. Weights stay fp32.

    Autocast keeps the bf16 copy of each trainable weight it casts until the outermost autocast region ends, and
    an optimizer's in-place update does not invalidate it: inside one region that spans training, every forward
    after the first step would run on the initial weights (measured: SmolLM2 SFT stopped learning, val loss 1.88
    instead of 0.61). So the engines clear that cache whenever the weights change (:func:`weights_changed`)."""
    _warn_if_bf16_is_emulated(cfg)
    if not bf16_enabled(cfg):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def weights_changed() -> None:
    """Drop autocast's bf16 copies of the weights (see :func:`stage_autocast`): call after every in-place update."""
    torch.clear_autocast_cache()


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # plain gloo; no 40 s C++ build
    return deepspeed


def local_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``), or the CPU: where a stage that runs outside the training
    engines (evaluation, scoring, sampling) puts its models and batches."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def place(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on :func:`local_device`, in eval mode: an inference-only model of a stage without an engine."""
    return model.to(local_device()).eval()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: data order is sharded explicitly, so ranks must agree on it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy on the input's device; the input is not modified). Identity in a single process.

    NCCL reduces CUDA tensors only, and the trainers keep their counters on the CPU: the sum travels through the
    GPU when the process group is NCCL's."""
    out = tensor.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        wire = out.to(local_device()) if torch.distributed.get_backend() == "nccl" else out
        torch.distributed.all_reduce(wire, op=torch.distributed.ReduceOp.SUM)
        out = wire.to(tensor.device)
    return out


def global_sum(value: float) -> float:
    """A Python number summed over ranks (token counts of a global batch)."""
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64)))


def global_max(value: float) -> float:
    """The largest of every rank's ``value`` (how many forwards each must run so that all run as many)."""
    local = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        wire = local.to(local_device()) if torch.distributed.get_backend() == "nccl" else local
        torch.distributed.all_reduce(wire, op=torch.distributed.ReduceOp.MAX)
        local = wire.cpu()
    return float(local)


def global_mean(values: list[float] | torch.Tensor, count: float | None = None) -> float:
    """Mean over every rank: the sum of all ranks' ``values`` over the sum of their ``count`` (default: how many
    values each rank has)."""
    local = torch.tensor([float(sum(values)), float(len(values) if count is None else count)], dtype=torch.float64)
    total, n = all_reduce_sum(local).tolist()
    return total / max(n, 1.0)


def global_moments(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(count, mean, population variance) of the masked entries of ``values`` over every rank."""
    from rlhf_core.algos.masked import masked_sums
    from rlhf_core.algos.ppo import moments_from_sums

    local = masked_sums(values, torch.ones_like(values) if mask is None else mask)
    return moments_from_sums(*all_reduce_sum(local).tolist())


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------- engines
class Engine(Protocol):
    """What a trainer may ask of a training engine (:class:`TorchEngine`, :class:`DeepSpeedEngine`)."""

    module: torch.nn.Module
    device: torch.device
    last_grad_norm: float | None  # of the last update, before clipping
    skipped_steps: int  # updates dropped for a non-finite gradient
    # True: an update whose gradient is non-finite is dropped whole, so a NaN loss may be backpropagated into it.
    # False: the engine would apply NaN gradients, so the caller must leave a non-finite loss out.
    drops_non_finite_updates: bool

    def set_boundary(self, last: bool) -> None: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def forward(self, **batch): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool: ...
    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path) -> None: ...
    @property
    def micro_steps(self) -> int: ...
    def current_lr(self) -> float: ...
    def unwrapped(self) -> torch.nn.Module: ...


class TorchEngine:
    """Plain single-process loop with the same stepping contract as a DeepSpeed engine."""

    drops_non_finite_updates = True  # step() checks the gradient norm and drops a non-finite update

    def __init__(self, model, optimizer, scheduler, accumulation: int, max_grad_norm, bf16: bool, device: torch.device):
        self.module = model.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation = accumulation
        self.max_grad_norm = max_grad_norm
        self.bf16 = bf16
        self.device = device
        self._micro = 0
        self._boundary: bool | None = None  # set_boundary's word for the coming micro-batch; None: count
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0

    def set_boundary(self, last: bool) -> None:
        """Declare, before its forward, whether the coming micro-batch ends the update (micro-batches sized by a
        token budget vary in number); without it the engine steps every ``accumulation`` micro-batches. The loss
        is still divided by ``accumulation``: callers' normalisers account for that."""
        self._boundary = last

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def forward(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        """Count a micro-batch; at the accumulation boundary clip, step and schedule. True if it stepped."""
        self._micro += 1
        at_boundary = self._micro % self.accumulation == 0 if self._boundary is None else self._boundary
        if not at_boundary:
            return False
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if not math.isfinite(self.last_grad_norm):
            # A non-finite gradient would poison the weights and Adam's moments: drop this update entirely.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return False
        self.optimizer.step()
        weights_changed()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save_state(self, directory: Path) -> None:
        """Weights, optimizer and scheduler state (for resuming), into ``directory``."""
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro": self._micro,
        }
        torch.save(state, Path(directory) / "engine.pt")

    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote. ``weights_only``: torch's restricted unpickler builds tensors and
        plain containers only, so a planted pickle is refused instead of run. Weights of another model (other
        keys or shapes) raise one ValueError line before anything is changed."""
        state = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True)
        saved, expected = state["module"], self.module.state_dict()
        missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or reshaped:
            example = reshaped[0] if reshaped else (missing or unexpected)[0]
            if reshaped:
                example += f" is {tuple(saved[example].shape)} there, {tuple(expected[example].shape)} here"
            raise ValueError(f"weights of another model: {len(missing)} missing, {len(unexpected)} unexpected and "
                             f"{len(reshaped)} reshaped tensors (e.g. {example})")  # fmt: skip
        self.module.load_state_dict(saved)
        weights_changed()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]

    @property
    def micro_steps(self) -> int:
        """Micro-batches stepped so far (what a checkpoint saves): tells whether the weights moved since."""
        return self._micro

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def unwrapped(self):
        return self.module


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine behind the TorchEngine interface."""

    drops_non_finite_updates = False  # DeepSpeed would apply NaN gradients

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module
        self.device = engine.device
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0

    def set_boundary(self, last: bool) -> None:
        """As :meth:`TorchEngine.set_boundary`; DeepSpeed must know it before the backward (ZeRO-2/3 reduce
        gradients inside it at the boundary)."""
        self.engine.set_gradient_accumulation_boundary(last)

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself when bf16 is on

    def forward(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            weights_changed()
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = None if norm is None else float(norm)
        return boundary

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (sharded weights, optimizer and scheduler); every rank must call it."""
        self.engine.save_checkpoint(str(directory), tag="engine")

    def load_state(self, directory: Path) -> None:
        """DeepSpeed reads its checkpoint with the full unpickler (``TorchCheckpointEngine.load`` in
        deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py calls ``torch.load(weights_only=False)``;
        no option changes that). So each file is first read by torch's weights-only unpickler, which besides
        tensors and plain containers allows only the three DeepSpeed classes these files hold; a file with anything
        else is refused before DeepSpeed unpickles it. Memory-mapped, the check parses each pickle without reading
        the tensors behind it."""
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            for file in sorted(Path(directory).rglob("*.pt")):
                try:
                    torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise ValueError(f"{file.relative_to(directory)}: {exc}") from exc
        self.engine.load_checkpoint(str(directory), tag="engine")
        weights_changed()

    def unwrapped(self):
        return self.engine.module


def deepspeed_config(
    optim: OptimizerConfig, micro_batch_size: int, accumulation: int, cfg: DistributedConfig, world_size: int
) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": optim.max_grad_norm or 0.0,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # ZeRO-3 shards parameters; gather them whole when the model is saved.
            **({"stage3_gather_16bit_weights_on_model_save": True} if cfg.zero_stage == 3 else {}),
            **_zero3_sharding(cfg),
            **({"reduce_bucket_size": cfg.reduce_bucket_size} if cfg.zero_stage >= 1 else {}),
        },
        "bf16": {"enabled": bf16_enabled(cfg)},
        "zero_allow_untested_optimizer": True,  # our client torch.optim.AdamW
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def frozen_deepspeed_config(cfg: DistributedConfig, micro_batch_size: int, world_size: int) -> dict:
    """A ZeRO-3 config without optimizer for an inference-only model (PPO's reference and reward model): its
    parameters are sharded over the ranks like a trained model's, and gathered layer by layer for each forward.

    DeepSpeed requires batch sizes even without training; they are the forward batch and are never used to step.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": {"stage": 3, **_zero3_sharding(cfg)},
        "bf16": {"enabled": bf16_enabled(cfg)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _zero3_sharding(cfg: DistributedConfig) -> dict:
    if cfg.zero_stage != 3:
        return {}
    return {"stage3_param_persistence_threshold": cfg.zero3_param_persistence_threshold}


def shards_parameters(ctx: DistContext, cfg: DistributedConfig) -> bool:
    """True under DeepSpeed ZeRO-3: no rank holds whole parameters, so every forward is a collective."""
    return ctx.engine == "deepspeed" and cfg.zero_stage == 3


def make_engine(
    model,
    optim: OptimizerConfig,
    total_steps: int,
    ctx: DistContext,
    cfg: DistributedConfig,
    micro_batch_size: int,
    accumulation: int,
) -> Engine:
    """AdamW + warm-up/decay schedule + the configured engine around ``model``: one optimizer step per
    ``accumulation`` micro-batches of ``micro_batch_size`` sequences on each process."""
    from rlhf_core.algos.schedules import lr_multiplier

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
    warmup = round(optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, warmup, optim.lr_schedule, optim.min_lr_ratio),
    )
    if ctx.engine == "torch":
        return TorchEngine(
            model, optimizer, scheduler, accumulation, optim.max_grad_norm, bf16_enabled(cfg), ctx.device
        )
    deepspeed = _import_deepspeed()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(optim, micro_batch_size, accumulation, cfg, ctx.world_size),
    )
    return DeepSpeedEngine(engine)


@dataclass
class FrozenModel:
    """An inference-only model. ``module`` is what to call. Under ZeRO-3 it is sharded and ``engine`` keeps the
    DeepSpeed engine alive: the engine's hooks gather each layer for its forward, and dropping it removes them."""

    module: torch.nn.Module
    engine: object | None = None


def make_frozen(model, micro_batch_size: int, ctx: DistContext, cfg: DistributedConfig) -> FrozenModel:
    """``model`` in eval mode without gradients: on the device as it is, or sharded over the ranks under ZeRO-3
    (so per-GPU memory falls with the number of processes, as it does for the trained models)."""
    model.eval().requires_grad_(False)
    if not shards_parameters(ctx, cfg):
        return FrozenModel(model.to(ctx.device))
    deepspeed = _import_deepspeed()
    engine, *_ = deepspeed.initialize(
        model=model, config=frozen_deepspeed_config(cfg, micro_batch_size, ctx.world_size)
    )
    engine.module.eval()
    return FrozenModel(engine.module, engine)


def gather_full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0, None elsewhere. Every rank must call it (ZeRO-3 gathers shards)."""
    if isinstance(engine, DeepSpeedEngine) and engine.engine.zero_optimization_stage() == 3:
        state = engine.engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.unwrapped().state_dict()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    return {name: tensor.detach().float().cpu() for name, tensor in state.items()}

"""Check a multi-GPU recipe without the GPUs: our config accepts it, DeepSpeed accepts every engine's config at the
recipe's world size, and ZeRO-3 model states of the four PPO models fit per GPU.

    .venv/bin/python bench/check_recipe.py                      # bench/recipes/llama7b_8gpu_zero3.yaml, 8 ranks
    .venv/bin/python bench/check_recipe.py --recipe FILE --world-size 4 --results /tmp/check.json

1. ``load_config(recipe)``: the pydantic validation every stage runs first; then the PPO batch split over the
   ranks (``config.ppo_sizes``) and the SFT/RM global batches against their split sizes (``steps_for``).
2. The DeepSpeed config dicts our code builds for each engine at ``--world-size`` ranks: SFT, RM, the PPO policy
   and critic (``distributed.deepspeed_config``) and the frozen reference and reward model
   (``distributed.frozen_deepspeed_config``). Each goes through ``deepspeed.runtime.config.DeepSpeedConfig``,
   DeepSpeed's own parser (batch arithmetic, ZeRO keys and ranges). DeepSpeedConfig takes its data-parallel
   world size from an ``mpu`` object when one is given (the hook model-parallel frameworks use to tell it the
   data-parallel size); here it reports ``--world-size`` while the process group has one rank.
3. Per-GPU memory of model states under ZeRO-3 for a 6.7 B Llama: the model directory's config.json, or the
   standard Llama-7B shape when the directory (a placeholder in the recipe) is not on this machine, built on the
   meta device with the Hugging Face classes we load (exact parameter counts, no memory). The
   policy and critic train: DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (no offload; 18 bytes per
   parameter over the ranks plus the largest layer gathered). The reference and reward model are frozen bf16
   shards (2 bytes per parameter over the ranks plus the same gathered-layer term); DeepSpeed's estimator assumes
   training, so those two lines are our arithmetic. ZeRO-2 is shown for comparison: there every GPU holds every
   model's parameters whole (the frozen two in fp32, as the ppo stage loads them at stages 0-2). Activations, the
   KV cache of generation and allocator slack come on top.

Writes ``bench/results/recipe_check.json`` (atomically) and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RECIPE = REPO / "bench" / "recipes" / "llama7b_8gpu_zero3.yaml"
DEFAULT_RESULTS = REPO / "bench" / "results" / "recipe_check.json"
GIB = 2**30
# The published Llama-7B shape (used when the recipe's model directory is not on this machine).
LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
FROZEN = ("ppo_reference", "ppo_reward_model")  # inference-only engines: no optimizer, never stepped
# DeepSpeed's estimators pad their results by this factor for buffers and fragmentation (their default).
BUFFER_FACTOR = 1.5


class DataParallelWorld:
    """The ``mpu`` DeepSpeedConfig asks for the data-parallel world size: every rank is a data-parallel rank."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--world-size", type=int, default=8, help="GPUs (processes) the recipe is meant for.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()

    from rlhf_core.config import load_config
    from rlhf_core.errors import RLHFError
    from rlhf_core.io import atomic_write_json

    try:
        config = load_config(args.recipe)
        batches = check_batches(config, args.world_size)
    except RLHFError as exc:
        sys.exit(f"error: {args.recipe} at {args.world_size} processes: {exc}")
    configs = engine_configs(config, args.world_size)
    accepted = {name: parse_with_deepspeed(ds_config, args.world_size) for name, ds_config in configs.items()}
    shapes, memory = memory_estimates(config, args.world_size)
    import deepspeed

    recipe = args.recipe.resolve()
    result = {
        "recipe": str(recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe),
        "world_size": args.world_size,
        "deepspeed": deepspeed.__version__,
        "batches": batches,
        "deepspeed_configs": configs,
        "deepspeed_accepted": accepted,
        "models": shapes,
        "memory_per_gpu_gib": memory,
    }
    atomic_write_json(args.results, result)
    _print_summary(result)
    print(f"wrote {args.results}")


def check_batches(config, world_size: int) -> dict:
    """The batch arithmetic each stage checks at start-up, at ``world_size`` ranks (raises ConfigError)."""
    from rlhf_core.config import ppo_sizes, steps_for

    ppo = config.ppo
    sizes = ppo_sizes(ppo, world_size)
    out = {}
    for stage, split in (("sft", "sft_train"), ("rm", "rm_train")):
        # File sources give at most data.splits.<split> rows; steps are for a full split.
        examples = getattr(config.data.splits, split)
        global_batch, steps = steps_for(examples, getattr(config, stage), world_size)
        out[stage] = {"split": split, "examples": examples, "global_batch": global_batch, "optimizer_steps": steps}
    out["ppo"] = {
        "rollout_per_gpu": sizes.local_rollout,
        "minibatch_per_gpu": sizes.local_minibatch,
        "updates_per_iteration": sizes.updates_per_iteration,
    }
    return out


def engine_configs(config, world_size: int) -> dict[str, dict]:
    """The DeepSpeed dicts our stages pass to ``deepspeed.initialize`` for every model, at ``world_size`` ranks."""
    from rlhf_core import distributed
    from rlhf_core.config import ppo_sizes

    ppo, dist_cfg = config.ppo, config.distributed
    sizes = ppo_sizes(ppo, world_size)
    clip = {} if ppo.resolved_tricks().global_grad_clip else {"max_grad_norm": None}
    frozen = distributed.frozen_deepspeed_config(dist_cfg, ppo.forward_batch_size, world_size)

    def trained(optim, micro_batch_size: int, accumulation: int) -> dict:
        return distributed.deepspeed_config(optim, micro_batch_size, accumulation, dist_cfg, world_size)

    return {
        "sft": trained(config.sft, config.sft.micro_batch_size, config.sft.gradient_accumulation_steps),
        "rm": trained(config.rm, config.rm.micro_batch_size, config.rm.gradient_accumulation_steps),
        "ppo_policy": trained(ppo.policy_optim.model_copy(update=clip), ppo.micro_batch_size, sizes.accumulation),
        "ppo_critic": trained(ppo.critic_optim.model_copy(update=clip), ppo.micro_batch_size, sizes.accumulation),
        **dict.fromkeys(FROZEN, frozen),
    }  # fmt: skip


def parse_with_deepspeed(ds_config: dict, world_size: int) -> dict:
    """DeepSpeed's parser on ``ds_config`` as rank 0 of ``world_size``: raises if DeepSpeed rejects it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _one_rank_group()
    parsed = DeepSpeedConfig(dict(ds_config), mpu=DataParallelWorld(world_size))
    if parsed.world_size != world_size:
        raise RuntimeError(f"DeepSpeedConfig saw world size {parsed.world_size}, not {world_size}")
    zero = parsed.zero_config
    return {
        "world_size": parsed.world_size,
        "train_batch_size": parsed.train_batch_size,
        "micro_batch_per_gpu": parsed.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": parsed.gradient_accumulation_steps,
        "zero_stage": int(parsed.zero_optimization_stage),
        "bf16": bool(parsed.bfloat16_config.enabled),
        "gradient_clipping": parsed.gradient_clipping,
        "param_persistence_threshold": int(zero.param_persistence_threshold),
        "reduce_bucket_size": int(zero.reduce_bucket_size),
        "gather_16bit_weights_on_model_save": bool(zero.gather_16bit_weights_on_model_save),
    }


def _one_rank_group() -> None:
    """DeepSpeedConfig reads the rank from the process group: start a one-process gloo group once."""
    import torch

    if torch.distributed.is_initialized():
        return
    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig

    distributed.setup(DistributedConfig(engine="deepspeed", backend="gloo"))


def memory_estimates(config, world_size: int) -> tuple[dict, dict]:
    """Parameter counts of the four PPO models and their per-GPU model-state memory (GiB) under ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, source = _model_shape(config)
    counts = {"causal_lm": _param_counts(shape, "causal_lm"), "reward_model": _param_counts(shape, "reward_model")}
    # The critic is the reward model read at every token (same parameters); the reference is the SFT policy.
    models = {
        "policy": ("causal_lm", True),
        "critic": ("reward_model", True),
        "reference": ("causal_lm", False),
        "reward_model": ("reward_model", False),
    }
    per_model = {}
    for name, (kind, trained) in models.items():
        total, largest = counts[kind]["total"], counts[kind]["largest_layer"]
        # zero_init=False: every process builds the whole model (fp32, on the CPU) before DeepSpeed shards it.
        host, zero3, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=world_size, cpu_offload=False, cpu_offload_params=False,
            zero_init=False, additional_buffer_factor=BUFFER_FACTOR,
        )  # fmt: skip
        _, zero2 = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=world_size, cpu_offload=False, additional_buffer_factor=BUFFER_FACTOR
        )
        if not trained:
            zero3 = 4 * largest + 2 * total / world_size  # bf16 shard + the gathered layer (DeepSpeed's 4 B term)
            zero2 = 4 * total  # at stages 0-2 our frozen models stay fp32, whole on every GPU
        per_model[name] = {
            "params": total,
            "trained": trained,
            "zero3": zero3 / GIB,
            "zero2": zero2 / GIB,
            "host_ram_while_loading": host / GIB,
        }
    memory = {
        "per_model": per_model,
        "total_zero3": sum(m["zero3"] for m in per_model.values()),
        "total_zero2": sum(m["zero2"] for m in per_model.values()),
        "host_ram_peak_while_loading": max(m["host_ram_while_loading"] for m in per_model.values()),
        "notes": "GPU: model states only (parameters, gradients, fp32 master, Adam moments); activations, the "
        "generation KV cache and allocator slack come on top. Trained: DeepSpeed's estimators, no offload. "
        "Frozen: bf16 shard 2 B/param / world + 4 B x largest layer (ZeRO-3); fp32 whole, 4 B/param (ZeRO-2, "
        "where the ppo stage leaves them as loaded). "
        "Host: DeepSpeed's zero_init=False estimate, the whole fp32 model in each of the node's processes "
        "(models are loaded one after another, so the peak is one model's).",
    }
    return {"source": source, "shape": shape, "param_counts": counts}, memory


def _model_shape(config) -> tuple[dict, str]:
    path = config.model.name_or_path
    if path and (Path(path) / "config.json").is_file():
        import json

        return json.loads((Path(path) / "config.json").read_text()), str(path)
    return dict(LLAMA_7B), f"{path} absent here: the standard Llama-7B shape"


def _param_counts(shape: dict, kind: str) -> dict:
    """Exact parameter counts of the Hugging Face classes we load, built on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    fields = {k: shape[k] for k in LLAMA_7B if k in shape}
    with torch.device("meta"):
        if kind == "causal_lm":
            model = LlamaForCausalLM(LlamaConfig(**fields))
        else:
            model = LlamaForSequenceClassification(LlamaConfig(**fields, num_labels=1))
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are listed once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "largest_layer": largest}


def _print_summary(result: dict) -> None:
    world = result["world_size"]
    print(f"recipe {result['recipe']}: accepted by our config; DeepSpeed {result['deepspeed']} at {world} ranks:")
    for name, got in result["deepspeed_accepted"].items():
        print(
            f"  {name:17s} ZeRO-{got['zero_stage']} bf16={got['bf16']} micro {got['micro_batch_per_gpu']} x accum "
            f"{got['gradient_accumulation_steps']} x {got['world_size']} = {got['train_batch_size']}"
            + ("" if name in FROZEN else f"  clip {got['gradient_clipping']}")
        )
    memory = result["memory_per_gpu_gib"]
    print(f"model states per GPU ({result['models']['source']}):")
    print(f"  {'model':13s} {'params':>14s} {'ZeRO-3 GiB':>11s} {'ZeRO-2 GiB':>11s}")
    for name, m in memory["per_model"].items():
        print(f"  {name:13s} {m['params']:>14,d} {m['zero3']:>11.2f} {m['zero2']:>11.2f}")
    print(f"  {'all four':13s} {'':>14s} {memory['total_zero3']:>11.2f} {memory['total_zero2']:>11.2f}")
    host = memory["host_ram_peak_while_loading"]
    print(f"host RAM while a model loads (fp32 in each of {world} processes, DeepSpeed's margin): {host:.0f} GiB")


if __name__ == "__main__":
    main()

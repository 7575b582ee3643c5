"""TRL side of bench/ppo_speed.py: one PPO run with TRL's PPOTrainer, timed per iteration and phase.

    .venv-trl/bin/python bench/_trl_ppo_worker.py SPEC.json RESULT.json

Runs in its own virtual environment (bench/setup_trl_venv.sh: trl 1.12.0, the last release with a PPO
trainer), so it imports nothing from rlhf_core: ``SPEC.json``, written by bench/ppo_speed.py, holds the model
and tokenizer paths, the prompt token ids of every iteration (the exact batches our trainer samples, already
encoded by our ``encode_query``) and the hyperparameters.

TRL's ``PPOTrainer.train`` does one iteration per loop pass: ``batch_generation`` (sampling, keeping the
per-step logits), then under ``no_grad`` the reference / value / reward forwards and GAE, then the epochs x
minibatches of the update with one optimizer over policy and value model, logging, and ``gc.collect``. Its code
is left as it is; the phases are timed from outside by wrapping the module-level functions it calls:

- generation: the call of ``batch_generation``;
- scoring: from its return to the first forward with gradients (the update's first micro-batch);
- training: from there to the start of the next iteration's generation (for the last iteration, the return of
  ``train()``); ``training_tail`` is its part after the update (metrics, callbacks, ``gc.collect``), from the
  per-iteration ``lr_scheduler.step`` call.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}.items():
    os.environ.setdefault(key, value)


def rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def response_lengths(responses, eos_id: int):
    """Tokens per response up to and including the first EOS (all of them when there is none)."""
    is_eos = (responses == eos_id).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).sum(dim=1)


def left_pad(sequences: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    return ids, mask


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    started = time.perf_counter()

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import accelerate
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    s = spec["settings"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"], padding_side="left")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def causal_lm():
        model = AutoModelForCausalLM.from_pretrained(spec["sft_model"], dtype=torch.float32)
        model.config.pad_token_id = model.generation_config.pad_token_id = pad_id
        return model

    def reward_shaped():
        model = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = pad_id
        return model

    # With LoRA (our model.lora), TRL puts the adapters on the policy and uses it with the adapters off as the
    # reference, as ours does; its value model trains in full (ours puts adapters on the critic too).
    lora = spec.get("lora")
    policy, reference = causal_lm(), None if lora else causal_lm()
    # Value model initialised from the reward model (PPO-max's critic init, TRL's usual recipe as well).
    value_model, reward_model = reward_shaped(), reward_shaped()

    batches = spec["batches"]  # one list of prompt token-id lists per iteration
    iterations = len(batches)
    rollout = s["rollout_size"]
    if any(len(b) != rollout for b in batches):
        raise SystemExit("every batch must hold rollout_size prompts")
    prompts = [ids for batch in batches for ids in batch]
    output_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    config = PPOConfig(
        output_dir=output_dir,
        seed=s["seed"],
        # Batch geometry: TRL's rollout is per_device_train_batch_size x gradient_accumulation_steps and
        # num_mini_batches splits it. Its micro-batch loop steps over the minibatch in per_device_train_batch_size
        # slices, so a per-device size of the whole rollout gives one micro-batch per minibatch; accumulation 1
        # then makes the optimizer step once per minibatch, as ours does (accumulation k > 1 would step once per
        # k micro-batches, i.e. across minibatches).
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // s["minibatch_size"],
        num_ppo_epochs=s["epochs"],
        total_episodes=iterations * rollout,
        local_rollout_forward_batch_size=s["forward_batch_size"],
        response_length=s["max_new_tokens"],
        stop_token="eos",
        temperature=s["temperature"],
        missing_eos_penalty=None,
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        whiten_rewards=False,
        cliprange=s["cliprange"],
        cliprange_value=s["cliprange_value"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        learning_rate=s["policy_lr"],
        lr_scheduler_type="constant",
        weight_decay=s["weight_decay"],
        adam_beta1=s["adam_beta1"],
        adam_beta2=s["adam_beta2"],
        adam_epsilon=s["adam_eps"],
        # No activation recomputation, and bf16 autocast only when ours has it (distributed.bf16): what our
        # trainer runs (PPOConfig defaults to bf16 and gradient checkpointing).
        bf16=bool(spec.get("bf16")),
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        num_sample_generations=0,  # no extra greedy sampling on an eval set
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if s["micro_batch_size"] != s["minibatch_size"]:
        raise SystemExit("the TRL side runs micro_batch_size == minibatch_size only")

    logged: list[dict] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                logged.append(dict(logs))

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    trainer = PPOTrainer(
        peft_config=peft_config,
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=Dataset.from_dict({"input_ids": prompts}),
        value_model=value_model,
        eval_dataset=Dataset.from_dict({"input_ids": prompts[:1]}),  # unused: num_sample_generations=0
        callbacks=[KeepLogs()],
    )
    # The trainer's printer callback would print every iteration's metrics; KeepLogs keeps them instead.
    trainer.callback_handler.callbacks = [
        cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ != "PrinterCallback"
    ]
    # Same prompts in the same order as our trainer: TRL's train() draws `next()` from `self.dataloader`, so a list
    # of ready, left-padded batches replaces its shuffled DataLoader (it reads only input_ids).
    trainer.dataloader = [
        dict(zip(("input_ids", "attention_mask"), left_pad(batch, pad_id), strict=True)) for batch in batches
    ]

    # ---------------------------------------------------------------------------------------- phase timing
    marks: list[dict] = []
    original_generation = ppo_module.batch_generation
    original_forward = ppo_module.forward

    def timed_generation(model, queries, *args, **kwargs):
        mark = {"gen_start": time.perf_counter()}
        if not marks:
            mark["rss_kib_at_start"] = rss_kib()
        marks.append(mark)
        query_responses, logits = original_generation(model, queries, *args, **kwargs)
        mark["gen_end"] = time.perf_counter()
        responses = query_responses[:, queries.shape[1] :]
        lengths = response_lengths(responses, eos_id)
        mark["response_tokens"] = int(lengths.sum())
        mark["eos_rate"] = float((responses == eos_id).any(dim=1).float().mean())
        mark["generated_width"] = int(responses.shape[1])
        mark["query_width"] = int(queries.shape[1])
        return query_responses, logits

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled() and marks and "train_start" not in marks[-1]:
            marks[-1]["train_start"] = time.perf_counter()
        return original_forward(model, query_responses, pad_token_id)

    ppo_module.batch_generation = timed_generation
    ppo_module.forward = timed_forward
    scheduler_step = trainer.lr_scheduler.step

    def timed_scheduler_step(*args, **kwargs):
        if marks:
            marks[-1]["update_end"] = time.perf_counter()
        return scheduler_step(*args, **kwargs)

    trainer.lr_scheduler.step = timed_scheduler_step

    # Optimizer steps actually taken (accelerate's wrapper skips the step between accumulation boundaries).
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer_steps = [0]
    optimizer.register_step_post_hook(lambda *args: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))

    setup_seconds = time.perf_counter() - started
    try:
        trainer.train()
        train_end = time.perf_counter()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)  # save_strategy="no": only the empty output_dir was made

    records = []
    for i, mark in enumerate(marks):
        end = marks[i + 1]["gen_start"] if i + 1 < len(marks) else train_end
        records.append(
            {
                "iteration": i + 1,
                "generation": mark["gen_end"] - mark["gen_start"],
                "scoring": mark["train_start"] - mark["gen_end"],
                "training": end - mark["train_start"],
                "training_tail": end - mark.get("update_end", end),
                "response_tokens": mark["response_tokens"],
                "samples": rollout,
                "eos_rate": mark["eos_rate"],
                "generated_width": mark["generated_width"],
                "query_width": mark["query_width"],
                "objective/scores": logged[i].get("objective/scores") if i < len(logged) else None,
                "objective/kl": logged[i].get("objective/kl") if i < len(logged) else None,
            }
        )
    if len(records) != iterations:
        raise SystemExit(f"expected {iterations} iterations, timed {len(records)}")
    expected_steps = iterations * s["epochs"] * (rollout // s["minibatch_size"])
    if optimizer_steps[0] != expected_steps:
        raise SystemExit(f"TRL took {optimizer_steps[0]} optimizer steps; one per minibatch is {expected_steps}")
    result = {
        "trainer": "trl",
        "records": records,
        "setup_seconds": setup_seconds,
        "rss_kib_at_first_iteration": marks[0].get("rss_kib_at_start"),
        "self_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch_threads": torch.get_num_threads(),
        "optimizer": type(optimizer).__name__,
        "optimizer_fused": optimizer.defaults.get("fused"),
        "optimizer_steps": optimizer_steps[0],
        "parameters": {
            "policy": sum(p.numel() for p in policy.parameters()),
            "value_model": sum(p.numel() for p in value_model.parameters()),
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "trl": trl.__version__,
        },
    }
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()

"""LoRA adapters (through ``peft``) on the trained models: the policy in SFT and PPO, the reward model, the critic.

With ``model.lora.enabled`` only the adapters (and a scalar head) train; the base weights stay frozen, so PPO's
reference is the policy with its adapters switched off and the base weights are held once. Every exported model is
merged: a plain Hugging Face directory that loads without ``peft``; the policy's adapter is saved beside it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from rlhf_core.config import LoraConfig


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, heads: tuple[str, ...] = ()) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``cfg.target_modules`` when ``cfg.enabled`` (else unchanged); ``heads``
    (e.g. a reward model's ``score``) train in full beside the adapters."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapter = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), modules_to_save=list(heads) or None)  # fmt: skip
    return get_peft_model(model, adapter)


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` with its adapters merged into the weights; ``model`` itself keeps training."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """``model`` as its base model: the SFT policy when ``model`` is the LoRA policy."""
    with model.disable_adapter():
        yield model


def save_causal_lm(model: torch.nn.Module, state_dict: dict | None, tokenizer, directory: Path) -> None:
    """Write a policy as a directory ``AutoModelForCausalLM.from_pretrained`` loads: merged when it carries LoRA
    adapters (which then go to ``directory``'s sibling ``adapter/``), else the given (gathered) ``state_dict``."""
    directory = Path(directory)
    if is_lora(model):
        model.save_pretrained(directory.parent / "adapter")
        tokenizer.save_pretrained(directory.parent / "adapter")
        merged(model).save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)

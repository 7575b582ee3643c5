"""The `ppo` stage, as phases over a typed batch (see ``stage.py`` for the order they run in)."""

from rlhf_core.trainers.ppo.stage import train_ppo

__all__ = ["train_ppo"]

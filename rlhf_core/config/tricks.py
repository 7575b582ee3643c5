"""The PPO-max switches: the resolved set the trainer reads (``Tricks``), the ``ppo.tricks`` group of overrides
(``TrickOverrides``, null = the preset's value) and the presets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model

from rlhf_core.config.base import _Group


class Tricks(_Group):
    """The resolved PPO-max switches (DESIGN.md trick table): a preset with ``ppo.tricks.*`` and ``ppo.kl_coef``
    applied. The trainer reads ``if tricks.<name>:``; each switch calls one ``rlhf_core.algos`` function."""

    reward_norm: bool = Field(description="Normalise scores with the running mean/std (eq. 18).")
    reward_clip: bool = Field(description="Clip (normalised) scores to [-ppo.reward_clip, +] (eq. 18).")
    reward_scaling: bool = Field(description="Divide scores by the running std without centring (MOSS's script).")
    advantage_norm: bool = Field(description="Whiten advantages per minibatch, moments over every rank (sec. 5.3.1).")
    advantage_clip: bool = Field(description="Clip advantages to [-ppo.advantage_clip, +].")
    kl_penalty: bool = Field(description="Token-level KL penalty to the SFT policy in the rewards (sec. 5.3.2).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(description="Per-token KL estimator.")
    kl_controller: Literal["fixed", "adaptive"] = Field(
        description="Fixed coefficient or Ziegler's adaptive controller (ppo.kl_target, ppo.kl_horizon)."
    )
    entropy_bonus: bool = Field(description="Entropy bonus (sec. 5.3.2; not recommended).")
    policy_loss_clip: bool = Field(description="Clipped surrogate policy loss (sec. 5.3).")
    value_loss_clip: bool = Field(description="Clip values around the old values (sec. 5.3).")
    critic_from_rm: bool = Field(
        description="Initialise the critic from the reward model (else: SFT trunk, zero head)."
    )
    critic_warmup: bool = Field(
        description="Train only the critic for ppo.critic_warmup_steps before policy updates (sec. 5.3.3)."
    )
    global_grad_clip: bool = Field(description="Clip gradient norms to ppo.*_optim.max_grad_norm (sec. 5.4).")
    ptx: bool = Field(description="PPO-ptx: SFT loss on demonstrations mixed into the policy loss (sec. 5.4).")
    kl_coef: float = Field(ge=0, description="KL penalty coefficient eta (set with ppo.kl_coef).")
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        description="gae: a critic's values and GAE (PPO); grpo / rloo: each answer against the other answers to its "
        "prompt (ppo.samples_per_prompt >= 2), no critic; reinforce_pp: returns whitened over the rollout, no critic."
    )

    @property
    def uses_critic(self) -> bool:
        """Whether a critic is built, trained and checkpointed: only GAE needs one."""
        return self.advantage_estimator == "gae"


# ppo.tricks: every switch of Tricks but kl_coef (ppo.kl_coef), null by default = the preset's value.
TrickOverrides = create_model(
    "TrickOverrides",
    __base__=_Group,
    __doc__="PPO-max switches (DESIGN.md trick table). null takes the value of ``ppo.preset``; an explicit value wins.",
    **{
        name: (field.annotation | None, Field(None, description=field.description))
        for name, field in Tricks.model_fields.items()
        if name != "kl_coef"
    },
)


_OFF = dict(reward_norm=False, reward_clip=False, reward_scaling=False, advantage_norm=False, advantage_clip=False,
            kl_penalty=False, kl_estimator="k1", kl_controller="fixed", entropy_bonus=False, policy_loss_clip=True,
            value_loss_clip=False, critic_from_rm=False, critic_warmup=False, global_grad_clip=False, ptx=False,
            kl_coef=0.0, advantage_estimator="gae")  # fmt: skip
# `vanilla`: nothing but the clipped surrogate; `moss_released`: what the paper's released script runs (reward
# scaling, policy and value clipping, critic from the RM, gradient clipping, KL 0.01); `ppo_max`: the paper's sec. 5.4.
PRESETS: dict[str, Tricks] = {
    "vanilla": Tricks(**_OFF),
    "moss_released": Tricks(**{**_OFF, "reward_scaling": True, "kl_penalty": True, "value_loss_clip": True,
                               "critic_from_rm": True, "global_grad_clip": True, "kl_coef": 0.01}),
    "ppo_max": Tricks(**{**_OFF, "reward_norm": True, "reward_clip": True, "advantage_norm": True, "kl_penalty": True,
                         "value_loss_clip": True, "critic_from_rm": True, "critic_warmup": True,
                         "global_grad_clip": True, "ptx": True, "kl_coef": 0.05}),
}  # fmt: skip
# The critic-free presets: PPO-max's policy side (reward normalisation and clipping, the KL penalty in the reward,
# the clipped surrogate, gradient clipping, PPO-ptx) with the baseline taken from the other answers to a prompt
# (GRPO, RLOO) or from the rollout (REINFORCE++) instead of a critic; the critic's switches are off. Their
# advantages come standardised (GRPO, REINFORCE++) or in score units by design (RLOO): no minibatch whitening.
_CRITIC_FREE = {**PRESETS["ppo_max"].model_dump(), "advantage_norm": False, "value_loss_clip": False,
                "critic_from_rm": False, "critic_warmup": False}  # fmt: skip
PRESETS.update({estimator: Tricks(**{**_CRITIC_FREE, "advantage_estimator": estimator})
                for estimator in ("grpo", "rloo", "reinforce_pp")})  # fmt: skip

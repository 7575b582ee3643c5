"""The four models of PPO (paper sec. 5): the policy and critic as training engines, the frozen reference and
reward model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rlhf_core import distributed
from rlhf_core.config import Config, OptimizerConfig, PPOSizes, Tricks
from rlhf_core.errors import DataError
from rlhf_core.io import read_json
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.critic import load_critic
from rlhf_core.models.lora import adapters_off, apply_lora
from rlhf_core.models.reward import load_reward_model


class PPOModels:
    """Policy and critic engines (one optimizer step per minibatch each) plus the frozen reference and reward model.

    Under ZeRO-3 all four are sharded over the ranks (the frozen two without optimizer), so each of N ranks holds
    about 1/N of every model; every forward then gathers layers from all ranks, which is why sampling runs with
    ``synced_gpus`` and the final evaluation runs on every rank.
    """

    def __init__(self, config: Config, tokenizer, ctx, sizes: PPOSizes, tricks: Tricks):
        ppo = config.ppo
        sft_dir, rm_dir = Path(config.paths.sft) / "model", Path(config.paths.rm) / "model"
        for path, stage in ((sft_dir, "sft"), (rm_dir, "rm")):
            if not (path / "config.json").is_file():
                raise DataError(f"no model at {path} (run `rlhf {stage}` first)")
        self.device = ctx.device
        self.sharded = distributed.shards_parameters(ctx, config.distributed)
        # Ranks stop sampling at different lengths; with sharded weights each must keep stepping until all are done.
        self.synced_gpus = self.sharded and ctx.world_size > 1
        lora = config.model.lora
        # With LoRA the reference is the policy with its adapters off: the SFT weights are held once.
        frozen = [] if lora.enabled else [load_causal_lm(sft_dir, tokenizer)]  # placed: by make_frozen below
        # The FrozenModel objects stay referenced: under ZeRO-3 they keep the engines whose hooks gather weights.
        self._frozen = [
            distributed.make_frozen(model, ppo.forward_batch_size, ctx, config.distributed)
            for model in (*frozen, load_reward_model(rm_dir, tokenizer.pad_token_id))  # placed: by make_frozen
        ]
        self._reference = None if lora.enabled else self._frozen[0].module
        self.reward_model = self._frozen[-1].module
        stats_file = rm_dir / "reward_stats.json"
        self.reward_stats = read_json(stats_file) if stats_file.is_file() else None
        self.length_debias = config.ppo.length_debias
        if self.length_debias:
            self.reward_stats = _length_fit_of(stats_file, self.reward_stats, "paths.rm")
        self.reward_members = self._ensemble(config, tokenizer, ctx)
        self.ensemble_penalty = config.ppo.ensemble_penalty
        policy = apply_lora(load_causal_lm(sft_dir, tokenizer), lora)

        def engine(model, optim: OptimizerConfig, total_steps: int):
            if not tricks.global_grad_clip:
                optim = optim.model_copy(update={"max_grad_norm": None})
            return distributed.make_engine(
                model, optim, total_steps, ctx, config.distributed, ppo.micro_batch_size, sizes.accumulation
            )

        self.policy = engine(policy, ppo.policy_optim, max(sizes.policy_updates, 1))
        self.critic = None  # the critic-free estimators (GRPO, RLOO, REINFORCE++) build none
        if tricks.uses_critic:
            critic = apply_lora(load_critic(rm_dir, sft_dir, tricks.critic_from_rm, tokenizer.pad_token_id), lora,
                                heads=("score",))  # fmt: skip
            self.critic = engine(critic, ppo.critic_optim, sizes.critic_updates)
        # Dropout off everywhere ("N implementation details" #13): log-probs of the rollout and of the update
        # must come from the same function, or the ratio is noise. Gradients flow in eval mode all the same.
        for trained in self.trained:
            trained.unwrapped().eval()

    def _ensemble(self, config: Config, tokenizer, ctx) -> list[tuple]:
        """``(model, score mean, score std, length fit or None)`` of every ensemble member, paths.rm first; empty
        for one RM. With ``ppo.length_debias`` the std is that of the score with its length term removed."""
        if not config.ppo.reward_ensemble:
            return []
        members = [(self.reward_model, Path(config.paths.rm), "paths.rm")]
        for i, directory in enumerate(config.ppo.reward_ensemble):
            where = f"ppo.reward_ensemble[{i}]"
            if not (Path(directory) / "model" / "config.json").is_file():
                raise DataError(f"{where}: no reward model at {Path(directory) / 'model'} (train one with `rlhf rm "
                                f"--set rm.seed=N --set paths.rm={directory}`)")  # fmt: skip
            member_dir = Path(directory) / "model"
            model = load_reward_model(member_dir, tokenizer.pad_token_id, role=where)  # placed: by make_frozen
            self._frozen.append(distributed.make_frozen(model, config.ppo.forward_batch_size, ctx, config.distributed))
            members.append((self._frozen[-1].module, Path(directory), where))
        out = []
        for model, directory, where in members:
            stats_file = directory / "model" / "reward_stats.json"
            if not stats_file.is_file():
                raise DataError(f"{where}: {stats_file} is missing; an ensemble standardises each member's scores "
                                "with it (the rm stage writes it)")  # fmt: skip
            stats = read_json(stats_file)
            if self.length_debias:  # each member standardised as it scores: with its length term taken out
                length = _length_fit_of(stats_file, stats, where)["length"]
                out.append((model, stats["mean"], max(length["residual_std"], 1e-6), length))
            else:
                out.append((model, stats["mean"], max(stats["std"], 1e-6), None))
        return out

    @contextlib.contextmanager
    def reference(self):
        """The frozen SFT policy, for KL and the final comparison: its own copy, or the LoRA policy with its
        adapters off."""
        if self._reference is not None:
            yield self._reference
        else:
            with adapters_off(self.policy.unwrapped()) as model:
                yield model

    @property
    def trained(self) -> list:
        """The training engines: the policy, and the critic where there is one."""
        return [self.policy] if self.critic is None else [self.policy, self.critic]

    @property
    def engines(self) -> dict:
        """What a checkpoint saves: the trained models with their optimizers and schedules."""
        return {"policy": self.policy} if self.critic is None else {"policy": self.policy, "critic": self.critic}


def _length_fit_of(stats_file: Path, stats: dict | None, where: str) -> dict:
    """``stats`` when it holds the length fit ``ppo.length_debias`` needs, else a DataError saying what to rerun."""
    if stats is None or "length" not in stats:
        raise DataError(
            f"{where}: ppo.length_debias needs the score's length fit in {stats_file}, which reward models trained "
            "before it was recorded lack; rerun `rlhf rm` (its reward statistics take a minute)"
        )
    return stats

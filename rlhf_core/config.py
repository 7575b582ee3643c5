"""Validated configuration: frozen pydantic models mirroring the groups of ``params.yaml`` one to one.

Every hyperparameter of the pipeline lives here with its default, its valid range and a description.
``load_config`` reads a params file, applies ``--set group.key=value`` overrides and turns any problem into
one :class:`ConfigError` line naming the key, the bad value and what is allowed, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from rlhf_core.errors import ConfigError
from rlhf_core.stages import STAGE_LIST


class _Group(BaseModel):
    # allow_inf_nan=False: ".inf" or ".nan" is never a sensible hyperparameter, and accepted it fails much later
    # with a message that blames something else.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- data
class SplitSizes(_Group):
    sft_train: int = Field(1600, ge=1, description="SFT demonstrations for training.")
    sft_val: int = Field(160, ge=1, description="SFT demonstrations held out for validation loss/perplexity.")
    rm_train: int = Field(1600, ge=1, description="Preference pairs for reward-model training.")
    rm_test: int = Field(400, ge=1, description="Preference pairs held out for reward-model evaluation.")
    ppo: int = Field(512, ge=1, description="Prompts for PPO rollouts.")
    eval: int = Field(200, ge=1, description="Prompts for the final win-rate evaluation.")


class CategoryWeights(_Group):
    arithmetic: float = Field(0.2, ge=0, description="Share of arithmetic questions ('What is 7 + 5?').")
    word_problem: float = Field(0.2, ge=0, description="Share of two-step word problems (step-by-step answers).")
    facts: float = Field(0.2, ge=0, description="Share of questions about the generated fictional knowledge base.")
    harmful: float = Field(0.2, ge=0, description="Share of harmful requests that should be refused politely.")
    benign_lookalike: float = Field(
        0.2, ge=0, description="Share of benign requests that look harmful and must not be refused."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> CategoryWeights:
        if sum(self.model_dump().values()) <= 0:
            raise ValueError("at least one category weight must be > 0")
        return self


class FlawWeights(_Group):
    """Relative frequency of each flaw among the demonstrator's flawed responses (where the flaw applies)."""

    wrong_answer: float = Field(1.0, ge=0, description="A wrong number, fact or tip.")
    over_refusal: float = Field(1.0, ge=0, description="Refusing a harmless request.")
    harmful_compliance: float = Field(3.0, ge=0, description="Complying with a harmful request.")
    rambling: float = Field(1.0, ge=0, description="Correct answer followed by filler sentences.")
    repetition: float = Field(1.0, ge=0, description="The answer sentence repeated several times.")
    no_ending: float = Field(1.0, ge=0, description="The response stops mid-sentence.")
    off_topic: float = Field(1.0, ge=0, description="A clean answer to a different question.")


class SimConfig(_Group):
    categories: CategoryWeights = Field(default_factory=CategoryWeights, description="Prompt category mix.")
    num_entities: int = Field(24, ge=2, le=500, description="Fictional countries in the generated knowledge base.")
    max_operand: int = Field(20, ge=2, le=10_000, description="Largest operand in arithmetic and word problems.")
    flaw_prob: float = Field(
        0.5, ge=0, le=1, description="Probability that a demonstration is flawed (noisy demonstrator)."
    )
    flaws: FlawWeights = Field(default_factory=FlawWeights, description="Mix of demonstrator flaws.")
    annotator_temperature: float = Field(
        2.0,
        gt=0,
        description="Bradley-Terry temperature of simulated annotators: P(a>b)=sigmoid((gold_a-gold_b)/T). "
        "Chosen so annotator-gold agreement is about 70-75% like human labellers (paper sec. 4, Anthropic HH).",
    )
    max_pair_attempts: int = Field(
        20, ge=1, description="Resamples of the second response until its gold score differs from the first."
    )

    @model_validator(mode="after")
    def _pairs_possible(self) -> SimConfig:
        # Flawless responses all score the same, so preference pairs need flawed ones.
        if self.flaw_prob == 0 or sum(self.flaws.model_dump().values()) == 0:
            raise ValueError(
                "preference pairs need flawed responses: data.sim.flaw_prob and at least one data.sim.flaws "
                "weight must be > 0"
            )
        return self


class DataConfig(_Group):
    source: Literal["sim", "hh_rlhf", "jsonl"] = Field(
        "sim", description="sim: built-in simulated assistant domain; hh_rlhf: Anthropic HH-RLHF file; jsonl."
    )
    seed: int = Field(1234, description="Seed of the generator and of every split shuffle.")
    path: str | None = Field(None, description="hh_rlhf: one .jsonl or .jsonl.gz file of chosen/rejected pairs.")
    sft_file: str | None = Field(None, description="jsonl: rows {prompt, response} for SFT (train+val).")
    rm_file: str | None = Field(None, description="jsonl: rows {prompt, chosen, rejected} for RM (train+test).")
    ppo_file: str | None = Field(None, description="jsonl: rows {prompt} for PPO and evaluation prompts.")
    splits: SplitSizes = Field(
        default_factory=SplitSizes,
        description="Split sizes; for file sources an upper bound, scaled down together when rows run short.",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row (file:line); skip: drop and count it."
    )
    max_prompt_chars: int = Field(4000, ge=1, description="Rows with a longer prompt are malformed.")
    max_response_chars: int = Field(2000, ge=1, description="Rows with a longer response are malformed.")
    max_prompt_tokens: int = Field(96, ge=4, description="Rows whose prompt tokenises longer are malformed.")
    max_response_tokens: int = Field(
        80,
        ge=2,
        description="Rows whose response (+EOS) tokenises longer are malformed; also generation cap.",
    )
    sim: SimConfig = Field(default_factory=SimConfig, description="The simulated assistant domain.")

    @model_validator(mode="after")
    def _source_files(self) -> DataConfig:
        if self.source == "hh_rlhf" and not self.path:
            raise ValueError("data.source=hh_rlhf needs data.path (a .jsonl or .jsonl.gz file)")
        if self.source == "jsonl" and not (self.sft_file and self.rm_file and self.ppo_file):
            raise ValueError("data.source=jsonl needs data.sft_file, data.rm_file and data.ppo_file")
        return self


# ----------------------------------------------------------------------------------------------- model
class LoraConfig(_Group):
    """LoRA adapters (peft) on every trained model: the policy (SFT, PPO), the reward model and the critic."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight (full fine-tuning).")
    rank: int = Field(16, ge=1, description="Rank r of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale alpha: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (PPO runs in eval mode).")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers that get adapters (Llama names: attention and MLP projections).",
    )


class ModelConfig(_Group):
    name_or_path: str | None = Field(
        None,
        description="A model of the local store (`rlhf models pull NAME`, e.g. smollm2-135m-instruct), a Hugging "
        "Face causal-LM directory, a .gguf file (converted into the store once) or a hub name; unset: a tiny Llama "
        "built from the sizes below with a BPE tokenizer trained on the prepared data.",
    )
    store: str = Field("models", min_length=1, description="The local model store: pulled and converted models.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (byte-level, 256 base symbols).")
    hidden_size: int = Field(128, ge=8, description="Tiny Llama: hidden size.")
    num_layers: int = Field(4, ge=1, description="Tiny Llama: decoder layers.")
    num_heads: int = Field(4, ge=1, description="Tiny Llama: attention heads (must divide hidden_size).")
    num_kv_heads: int = Field(4, ge=1, description="Tiny Llama: key/value heads (grouped-query attention).")
    intermediate_size: int = Field(352, ge=8, description="Tiny Llama: MLP intermediate size.")
    max_position_embeddings: int = Field(256, ge=16, description="Tiny Llama: longest sequence.")
    init_seed: int = Field(0, description="Seed of the tiny model's weight initialisation.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be divisible by model.num_kv_heads={self.num_kv_heads}"
            )
        return self


# ----------------------------------------------------------------------------------------------- stages
class OptimizerConfig(_Group):
    """AdamW and its learning-rate schedule: the shape every trained model's optimiser shares (SFT, the reward
    model, the PPO policy and the PPO critic)."""

    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of optimizer steps with linear warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Global gradient-norm clipping; null: off.")


class OptimConfig(OptimizerConfig):
    """A supervised training stage (SFT, RM): its optimiser plus data passes, batch shape and validation."""

    seed: int = Field(42, description="Seed of data order, dropout and sampling for this stage.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward pass on one process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Micro-batches by token budget (per process): each optimizer step's examples grouped by length, "
        "every micro-batch at most this many positions (rows x its longest row; a preference pair counts both of its "
        "sequences). null: micro_batch_size examples each. Must hold the longest row.",
    )
    eval_every: int = Field(50, ge=1, description="Validate every N optimizer steps (and at the end).")


class SamplingConfig(_Group):
    """How responses are sampled (paper sec. 6.1): PPO rollouts, the RM's reward statistics (which use PPO's) and
    the win-rate evaluation. Top-k is off: the paper samples with nucleus only."""

    temperature: float = Field(0.8, gt=0, description="Sampling temperature (paper sec. 6.1: 0.8).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling (paper sec. 6.1: 0.9).")
    repetition_penalty: float = Field(1.1, ge=1, description="Repetition penalty (paper sec. 6.1: 1.1).")


class SFTConfig(OptimConfig):
    epochs: float = Field(10.0, gt=0, description="Passes over the SFT split.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward pass on one process.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-3, gt=0, le=1, description="Peak learning rate; tiny models from scratch need ~1e-3.")
    num_sample_generations: int = Field(
        32, ge=0, description="Validation prompts answered greedily after training, saved as samples.jsonl."
    )


class RMConfig(OptimConfig):
    """Reward-model training (paper sec. 4.1, eq. 2). Consumed by the `rm` stage."""

    epochs: float = Field(2.0, gt=0, description="Passes over the RM split (paper: about 1; 2 suit the tiny model).")
    lr: float = Field(5e-4, gt=0, le=1, description="Peak LR (paper: 5e-6 for 7B; tiny models need more).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Paper p.8: 10% warm-up.")
    beta_rm: float = Field(1.0, ge=0, description="Weight of the LM loss on the chosen response (eq. 2; paper 1).")
    margin: float = Field(0.0, ge=0, description="Margin in -log sigmoid(r_c - r_r - margin); 0: off.")
    center_coef: float = Field(0.0, ge=0, description="Penalty on the mean squared score (reward centring).")
    init_from: str | None = Field(
        None, description="Model the RM starts from (causal LM or reward-model directory); null: the SFT policy."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rm_train held out for validation and best-checkpoint selection."
    )
    best_metric: Literal["loss", "accuracy"] = Field(
        "loss",
        description="Validation metric that picks the saved checkpoint: ranking loss (lower) or accuracy "
        "(higher). The loss is the less noisy choice on a few hundred pairs.",
    )
    mismatch_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Extra training pairs, as a share of rm_train, that prefer a prompt's own chosen response to "
        "another prompt's (teaches the RM to check the answer fits the question; 0: off, as in the paper).",
    )
    reward_stats_prompts: int = Field(
        256,
        ge=1,
        description="PPO prompts answered by the SFT policy (PPO sampling settings) to measure the mean and std "
        "of RM scores, saved beside the model so PPO starts with calibrated rewards.",
    )


class RMEvalConfig(_Group):
    """Reward-model evaluation on rm_test (paper sec. 4, fig. 2). Consumed by the `rm-eval` stage."""

    batch_size: int = Field(64, ge=1, description="Sequences scored per forward pass.")
    calibration_bins: int = Field(10, ge=2, le=100, description="Confidence bins of the calibration plot.")
    num_confident_errors: int = Field(20, ge=0, description="Most confidently wrong pairs listed in the table.")
    histogram_bins: int = Field(40, ge=5, le=500, description="Bins of the score-gap histogram (paper fig. 2).")


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


# ppo.tricks: every switch of Tricks but kl_coef (ppo.kl_coef), null by default = the preset's value.
TricksConfig = create_model(
    "TricksConfig",
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
            kl_coef=0.0)  # fmt: skip
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


class PolicyOptimizerConfig(OptimizerConfig):
    lr: float = Field(
        3e-5, gt=0, le=1, description="Policy learning rate (paper/code: 5e-7 for 7B; the tiny model needs more)."
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of optimizer steps with linear warm-up.")


class CriticOptimizerConfig(PolicyOptimizerConfig):
    lr: float = Field(1e-4, gt=0, le=1, description="Critic learning rate (paper: 1.65e-6 for 7B; code: 1.5e-6).")


class MonitorConfig(_Group):
    """What PPO watches while it trains: the paper's collapse signals (sec. 5.2), non-finite updates, samples."""

    collapse_kl: float = Field(8.0, gt=0, description="Collapse warning: KL to the reference (nats/sequence).")
    collapse_length_ratio: float = Field(
        2.0, gt=1, description="Collapse warning: mean length beyond ratio x (or below 1/ratio of) the first."
    )
    collapse_ppl_ratio: float = Field(0.5, gt=0, lt=1, description="Collapse warning: policy ppl below ratio x ref.")
    stop_on_collapse: bool = Field(
        False, description="Stop at the first collapse warning, keeping the last healthy checkpoint."
    )
    max_bad_steps: int = Field(3, ge=1, description="Consecutive non-finite updates before the run stops.")
    sample_every: int = Field(10, ge=1, description="Keep a table of sampled prompts, responses and scores.")


class CheckpointConfig(_Group):
    every: int = Field(10, ge=1, description="Save the full training state every N iterations.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest checkpoint written by the same configuration."
    )


class PPOConfig(_Group):
    """PPO-max (paper sec. 5, App. C). Consumed by the `ppo` stage."""

    seed: int = Field(42, description="Seed of rollouts and minibatch order.")
    preset: Literal["vanilla", "moss_released", "ppo_max"] = Field(
        "ppo_max", description="Trick preset; ppo.tricks.* and ppo.kl_coef override single switches."
    )
    tricks: TricksConfig = Field(default_factory=TricksConfig, description="Per-trick overrides of the preset.")
    steps: int = Field(150, ge=1, description="PPO iterations (rollout, then update), critic warm-up included.")
    rollout_size: int = Field(64, ge=1, description="Samples per experience buffer (paper: 128).")
    minibatch_size: int = Field(32, ge=1, description="Samples per PPO minibatch, one optimizer step (paper: 32).")
    micro_batch_size: int = Field(
        32, ge=1, description="Sequences per forward/backward per process; micro-batches accumulate to a minibatch."
    )
    forward_batch_size: int = Field(
        64, ge=1, description="Sequences per no-grad scoring forward when ppo.max_tokens_per_forward is null."
    )
    max_tokens_per_micro_batch: int | None = Field(
        512,
        ge=1,
        description="Update micro-batches by token budget (per process): each minibatch's rows grouped by length, "
        "every micro-batch at most this many positions (rows x its longest row, query + response). null: "
        "ppo.micro_batch_size rows each. Must hold the longest row (data.max_prompt_tokens + max_response_tokens).",
    )
    max_tokens_per_forward: int | None = Field(
        1024,
        ge=1,
        description="Scoring forwards by token budget: the rollout's rows grouped by length, each forward at most "
        "this many positions. null: ppo.forward_batch_size rows each. The policy is always scored in the update's "
        "first-epoch micro-batches (its old log-probs are then the update's own arithmetic).",
    )
    logprob_chunk_tokens: int = Field(
        4096,
        ge=1,
        description="Positions per chunk when scoring turns logits into log-probs, entropy and perplexity terms: no "
        "float32 (rows x width x vocabulary) tensor exists for a whole forward, only for a chunk.",
    )
    generation_batch_size: int = Field(
        256,
        ge=1,
        description="Sequences per generate call during rollout. Decoding is bound by per-token kernel launches, "
        "so a bigger batch costs little more time, and its memory is the KV cache, not full-vocabulary logits "
        "(on an H200, one call over 256 sequences ran 3.0x faster than four calls of 64).",
    )
    epochs: int = Field(1, ge=1, description="Passes over the buffer (paper sec. 5.4: 1).")
    policy_optim: PolicyOptimizerConfig = Field(
        default_factory=PolicyOptimizerConfig, description="The policy's AdamW and schedule."
    )
    critic_optim: CriticOptimizerConfig = Field(
        default_factory=CriticOptimizerConfig, description="The critic's AdamW and schedule."
    )
    kl_coef: float | None = Field(
        None, ge=0, description="KL penalty eta; null: the preset's (ppo_max 0.05, paper Fig. 7; moss 0.01)."
    )
    kl_target: float = Field(6.0, gt=0, description="Adaptive controller: target KL per sequence (Ziegler: 6).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller: horizon in samples (Ziegler: 10000).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount (code: 1.0).")
    lam: float = Field(0.9, ge=0, le=1, description="GAE lambda (paper App. C.3: 0.9; code: 0.95).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (paper sec. 5.3).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around old values (paper sec. 5.3).")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the value loss (code: 1.0).")
    reward_clip: float = Field(5.0, gt=0, description="delta of eq. 18: normalised scores clipped to [-d, d].")
    advantage_clip: float = Field(0.5, gt=0, description="Advantage clip bound (code: 0.5).")
    entropy_coef: float = Field(0.01, ge=0, description="Entropy bonus weight when tricks.entropy_bonus.")
    ptx_coef: float = Field(0.5, ge=0, description="PPO-ptx weight of the SFT loss (paper gives no value).")
    critic_warmup_steps: int = Field(5, ge=0, description="Critic-only iterations when tricks.critic_warmup.")
    reward_ensemble: list[str] = Field(
        default_factory=list,
        description="Directories of more `rlhf rm` outputs scored with paths.rm as one ensemble (empty: the one RM); "
        "train each with another rm.seed, e.g. `rlhf rm --set rm.seed=7 --set paths.rm=outputs/rm_s7`.",
    )
    ensemble_penalty: float = Field(
        1.0, ge=0, description="Ensemble score = mean - penalty x std of the members' standardised scores."
    )
    missing_eos_penalty: float | None = Field(
        None, description="Subtracted from the score of responses that hit the length cap without EOS; null: off."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Rollout sampling (sec. 6.1).")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Collapse monitor and samples.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and resume.")

    def resolved_tricks(self) -> Tricks:
        """The preset's switches with every explicit ``tricks.*`` (and ``kl_coef``) applied on top."""
        explicit = {k: v for k, v in self.tricks.model_dump().items() if v is not None}
        if self.kl_coef is not None:
            explicit["kl_coef"] = self.kl_coef
        return PRESETS[self.preset].model_copy(update=explicit)

    @model_validator(mode="after")
    def _sizes_divide(self) -> PPOConfig:
        # One process is the least any run has; sizes that do not divide there divide nowhere (ppo_sizes).
        problem = _ppo_size_problem(self, world_size=1)
        if problem:
            raise ValueError(problem)
        return self


@dataclass(frozen=True)
class PPOSizes:
    """Sizes the PPO stage derives from ``ppo.*`` and the number of processes, computed once (``ppo_sizes``)."""

    world_size: int
    local_rollout: int  # rollouts sampled by each process per iteration
    minibatches: int  # minibatches (optimizer steps of each model) per epoch over the buffer
    local_minibatch: int  # each process's share of a minibatch
    accumulation: int  # micro-batches accumulated into one optimizer step on each process
    updates_per_iteration: int  # epochs x minibatches
    warmup_iterations: int  # critic-only iterations at the start
    policy_updates: int  # optimizer steps of the policy over the run
    critic_updates: int  # optimizer steps of the critic over the run


def _ppo_size_problem(ppo: PPOConfig, world_size: int) -> str | None:
    if (
        ppo.rollout_size % ppo.minibatch_size
        or ppo.minibatch_size % world_size
        or (ppo.minibatch_size // world_size) % ppo.micro_batch_size
    ):
        return (
            f"ppo.rollout_size={ppo.rollout_size} must be a multiple of ppo.minibatch_size={ppo.minibatch_size}, "
            f"which must split evenly over {world_size} process(es) into micro-batches of "
            f"ppo.micro_batch_size={ppo.micro_batch_size}"
        )
    warmup = ppo.critic_warmup_steps if ppo.resolved_tricks().critic_warmup else 0
    if warmup >= ppo.steps:
        return f"ppo.critic_warmup_steps={warmup} leaves no policy update in ppo.steps={ppo.steps}"
    return None


def ppo_sizes(ppo: PPOConfig, world_size: int) -> PPOSizes:
    """Rollout -> minibatches -> each process's micro-batches, by exact division, or a ConfigError saying what to
    change (bench/check_recipe.py checks a recipe's sizes with it too)."""
    problem = _ppo_size_problem(ppo, world_size)
    if problem:
        raise ConfigError(problem)
    minibatches = ppo.rollout_size // ppo.minibatch_size
    local_minibatch = ppo.minibatch_size // world_size
    warmup = ppo.critic_warmup_steps if ppo.resolved_tricks().critic_warmup else 0
    updates = ppo.epochs * minibatches
    return PPOSizes(
        world_size=world_size,
        local_rollout=ppo.rollout_size // world_size,
        minibatches=minibatches,
        local_minibatch=local_minibatch,
        accumulation=local_minibatch // ppo.micro_batch_size,
        updates_per_iteration=updates,
        warmup_iterations=warmup,
        policy_updates=(ppo.steps - warmup) * updates,
        critic_updates=ppo.steps * updates,
    )


class EvalConfig(_Group):
    """Win-rate evaluation (paper sec. 6). Consumed by the `eval` stage."""

    seed: int = Field(7, description="Seed of generation and bootstrap.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Paper sec. 6.1 sampling.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for the 95% intervals.")
    rm_tie_margin: float = Field(
        0.0, ge=0, description="The RM judge calls a tie when the two scores differ by at most this much."
    )
    batch_size: int = Field(64, ge=1, description="Prompts sampled or scored per forward pass.")
    num_examples: int = Field(20, ge=0, description="Example pairs in the table (judge disagreements first).")


class GenerationEngineConfig(_Group):
    """How responses are generated wherever the pipeline samples (PPO rollouts and its end-of-run comparison, the
    RM's reward statistics, SFT's sample answers, the eval stage). The distribution is ``ppo.sampling`` /
    ``eval.sampling``'s whatever the engine; the engine decides how the work is batched, hence the random stream."""

    engine: Literal["auto", "generate", "continuous"] = Field(
        "auto",
        description="generate: transformers' generate over a left-padded batch (a finished response keeps its slot "
        "until the longest ends); continuous: transformers' continuous batching with paged attention (finished "
        "responses leave the batch, new ones join it; the paper's repetition penalty included); auto: continuous on "
        "CUDA and for models of cpu_continuous_min_parameters on the CPU, generate otherwise, under multi-process "
        "ZeRO-3 and where bf16 autocast runs over float32 weights (docs/results/benchmarks.md, 'Rollout engines').",
    )
    max_batch_tokens: int = Field(
        2048,
        ge=16,
        description="continuous: tokens one scheduler step runs (prompt chunks plus one per decoding response); "
        "bounds the activations of a step, not the KV cache.",
    )
    cuda_graphs: bool = Field(
        True,
        description="continuous on CUDA: decode through captured CUDA graphs, captured once per model and run.",
    )
    cpu_continuous_min_parameters: int = Field(
        100_000_000,
        ge=0,
        description="auto on the CPU: continuous for models of at least this many parameters, generate below. "
        "Measured on 2 cores: the SmolLM2 sim recipe's SFT policy (135 M, answers ending well before the cap) "
        "sampled 1.43x faster with continuous; the 0.14-0.9 M tiny models 0.3x as fast.",
    )


class DistributedConfig(_Group):
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: plain single-process/DDP-free loop; deepspeed: a DeepSpeed ZeRO engine."
    )
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on GPU, gloo on CPU."
    )
    bf16: bool = Field(False, description="bfloat16 mixed precision (DeepSpeed bf16 / torch autocast).")
    zero3_param_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="ZeRO-3: parameters with fewer elements stay whole on every rank instead of being sharded "
        "(DeepSpeed's stage3_param_persistence_threshold and its default; 0 shards every parameter).",
    )
    reduce_bucket_size: int = Field(
        500_000_000,
        ge=1,
        description="ZeRO 1-3: gradient elements reduced together (DeepSpeed's reduce_bucket_size and its default). "
        "ZeRO-2/3 allocate a bucket this size whatever the model: 1.9 GB of fp32 at the default; a few times "
        "hidden_size^2 is enough.",
    )


class TrackingConfig(_Group):
    enabled: bool = Field(True, description="Log to MLflow.")
    uri: str = Field(
        "sqlite:///mlflow.db", description="MLflow tracking URI; default: a local SQLite store, no server."
    )
    experiment: str = Field("rlhf-ppo-max", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field(
        "rlhf-ppo-max-policy", min_length=1, description="Model-registry name of the PPO policy (a version per run)."
    )


class _PathsBase(_Group):
    """Where each stage commits its outputs. A relative path must stay inside the project (the working directory);
    an absolute path is taken as the user's explicit choice. No two stages share a directory or nest."""

    @model_validator(mode="after")
    def _separate_and_inside_the_project(self) -> _PathsBase:
        project = Path.cwd().resolve()
        resolved = {}
        for name, value in self.model_dump().items():
            problem = _output_path_problem(value, project)
            if problem:
                raise ValueError(f"paths.{name}={value!r} {problem}")
            resolved[name] = (project / value).resolve()
        names = list(resolved)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if (
                    resolved[a] == resolved[b]
                    or resolved[a] in resolved[b].parents
                    or resolved[b] in resolved[a].parents
                ):
                    raise ValueError(
                        f"paths.{a}={getattr(self, a)!r} and paths.{b}={getattr(self, b)!r} overlap: one stage would "
                        "overwrite or delete the other's outputs; give each stage its own directory"
                    )
        return self


# One field per stage, from its declaration (rlhf_core/stages.py): a new stage gets its directory setting there.
PathsConfig = create_model(
    "PathsConfig",
    __base__=_PathsBase,
    **{
        stage.path_key: (str, Field(f"outputs/{stage.path_key}", min_length=1, description=stage.describe_outputs()))
        for stage in STAGE_LIST
    },
)


def describe_config(config: BaseModel, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as --set takes it, description) for every leaf of ``config``; ``ppo.tricks.*`` left
    null show the preset's value they resolve to."""
    rows: list[tuple[str, str, str]] = []
    for name, field in type(config).model_fields.items():
        value, key = getattr(config, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += describe_config(value, f"{key}.")
            continue
        shown = _as_set_value(value)
        rows.append((key, shown, field.description or ""))
    if isinstance(config, Config):
        resolved = config.ppo.resolved_tricks()
        rows = [_with_preset_value(row, resolved, config.ppo.preset) for row in rows]
    return rows


def _as_set_value(value: Any) -> str:
    """``value`` as YAML writes it, so the printed value is what ``--set key=value`` takes."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _with_preset_value(row: tuple[str, str, str], resolved: BaseModel, preset: str) -> tuple[str, str, str]:
    key, shown, description = row
    name = (
        key.removeprefix("ppo.tricks.")
        if key.startswith("ppo.tricks.")
        else "kl_coef"
        if key == "ppo.kl_coef"
        else None
    )
    if shown != "null" or name is None or not hasattr(resolved, name):
        return row
    value = getattr(resolved, name)
    return key, f"null ({preset}: {str(value).lower() if isinstance(value, bool) else value})", description


def _output_path_problem(value: str, project: Path) -> str | None:
    """Why ``value`` cannot be a stage's output directory, or None."""
    if "\0" in value or any(ord(ch) < 32 for ch in value):
        return "contains a control character"
    if value.startswith("~"):
        return "starts with '~', which no stage expands; write the full path"
    path = Path(value)
    target = (project / path).resolve()
    if target == project or target in project.parents:
        return "is the project directory or one of its parents: a stage replaces its directory's contents"
    if target == Path.home().resolve() or target == Path(target.anchor):
        return "is the home or root directory"
    if not path.is_absolute() and project not in target.parents:
        return "leaves the project directory; use an absolute path to write outside it on purpose"
    return None


class Config(_Group):
    data: DataConfig = Field(default_factory=DataConfig, description="Data preparation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model and tokenizer.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning.")
    rm: RMConfig = Field(default_factory=RMConfig, description="Reward model.")
    rm_eval: RMEvalConfig = Field(default_factory=RMEvalConfig, description="Reward-model evaluation.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO-max.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Win-rate evaluation.")
    generation: GenerationEngineConfig = Field(default_factory=GenerationEngineConfig, description="Rollout engine.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Training engine.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Stage output directories.")

    @model_validator(mode="after")
    def _lora_unsharded(self) -> Config:
        if self.model.lora.enabled and self.distributed.engine == "deepspeed" and self.distributed.zero_stage == 3:
            raise ValueError("model.lora.enabled with distributed.zero_stage=3 is not supported yet: use ZeRO 0-2")
        return self

    @model_validator(mode="after")
    def _budgets_hold_the_longest_row(self) -> Config:
        longest = self.data.max_prompt_tokens + self.data.max_response_tokens
        budgets = [("ppo", "max_tokens_per_micro_batch", 1), ("ppo", "max_tokens_per_forward", 1),
                   ("sft", "max_tokens_per_micro_batch", 1), ("rm", "max_tokens_per_micro_batch", 2)]  # fmt: skip
        for group, name, sequences in budgets:
            budget, need = getattr(getattr(self, group), name), sequences * longest
            if budget is not None and budget < need:
                pair = " x 2 (a preference pair's two sequences)" if sequences > 1 else ""
                raise ValueError(
                    f"{group}.{name}={budget} cannot hold the longest row: (data.max_prompt_tokens + "
                    f"data.max_response_tokens){pair} = {need}; raise it to at least {need} or set it to null"
                )
        return self

    @model_validator(mode="after")
    def _sequences_fit_the_tiny_model(self) -> Config:
        # A pretrained model's positions are known once it is loaded (`rlhf prepare` checks them); the tiny one's now.
        total = self.data.max_prompt_tokens + self.data.max_response_tokens
        if self.model.name_or_path is None and total > self.model.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_tokens + data.max_response_tokens = {total} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        return self


# ----------------------------------------------------------------------------------------------- loading
def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(keys[: depth + 1])}' is a value, not a group")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'sft.lr=3e-4'`` -> ``('sft.lr', 0.0003)``; the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected group.key=value, e.g. --set sft.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"--set {text!r}: the key must name a group and a field, e.g. sft.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for key in path:
        field = model.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


# Keys of earlier releases and where they live now: an old params file gets told where each one went.
_BOTH_OPTIMIZERS = "ppo.policy_optim.{0} and ppo.critic_optim.{0}"
MOVED_KEYS: dict[str, str] = {
    "ppo.policy_lr": "ppo.policy_optim.lr",
    "ppo.critic_lr": "ppo.critic_optim.lr",
    "ppo.warmup_steps": _BOTH_OPTIMIZERS.format("warmup_ratio") + " (a fraction of the optimizer steps)",
    **{f"ppo.{k}": _BOTH_OPTIMIZERS.format(k) for k in (
        "lr_schedule", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm")},
    **{f"{group}.{k}": f"{group}.sampling.{k}" for group in ("ppo", "eval")
       for k in ("temperature", "top_p", "repetition_penalty")},
    **{f"ppo.{k}": f"ppo.monitor.{k}" for k in (
        "collapse_kl", "collapse_length_ratio", "collapse_ppl_ratio", "stop_on_collapse", "max_bad_steps",
        "sample_every")},
    "ppo.checkpoint_every": "ppo.checkpoint.every",
    "ppo.resume": "ppo.checkpoint.resume",
}  # fmt: skip


def _format_validation_error(err: ValidationError, tree: dict, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            if key in MOVED_KEYS:
                lines.append(f"{source}: '{key}' has moved: set {MOVED_KEYS[key]} instead")
                continue
            allowed = ", ".join(_allowed_keys(Config, loc[:-1]))
            lines.append(f"{source}: unknown key '{key}'; allowed here: {allowed}")
            continue
        bad = item.get("input")
        msg = item["msg"].removeprefix("Value error, ")
        if isinstance(bad, dict):
            lines.append(f"{source}: {key}: {msg}")
        else:
            lines.append(f"{source}: {key} = {bad!r}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the last
    one, so a second ``sft:`` group would silently replace the first with its few keys (and defaults)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: key '{key}' is given twice "
                    f"(first on line {seen[key] + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> dict:
    """The params file as a tree of groups, or one ConfigError line naming the file, the line and the problem."""
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params FILE)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        loader = _UniqueKeyLoader(text)  # the reader checks every character here (NUL and the like)
        loader.name = str(path)
        try:
            tree = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if tree is None:
        raise ConfigError(f"{path}: the params file is empty; write the groups to change, or copy params.yaml")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of groups at the top level")
    return tree


def load_config(params_file: str | Path | None = "params.yaml", overrides: list[str] | tuple = ()) -> Config:
    """Read ``params_file`` (None: the built-in defaults), apply ``group.key=value`` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if params_file is not None:
        tree = read_params_file(Path(params_file))
        source = str(params_file)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"--set {text}")
    if overrides:
        source = f"{source} + --set"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, tree, source)) from None


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    from rlhf_core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'sft': {'lr': 1}}`` -> ``{'sft.lr': 1}`` (for MLflow params and comparisons)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def steps_for(num_examples: int, optim: OptimConfig, world_size: int) -> tuple[int, int]:
    """(global batch size, optimizer steps) for a split: exact division, or a clear error."""
    global_batch = optim.micro_batch_size * optim.gradient_accumulation_steps * world_size
    if num_examples < global_batch:
        raise ConfigError(
            f"the split has {num_examples} examples but one optimizer step needs a global batch of "
            f"{global_batch} (micro_batch_size {optim.micro_batch_size} x gradient_accumulation_steps "
            f"{optim.gradient_accumulation_steps} x {world_size} processes); lower the batch or add data"
        )
    if optim.max_steps is not None:
        return global_batch, optim.max_steps
    return global_batch, max(1, math.floor(num_examples * optim.epochs / global_batch))

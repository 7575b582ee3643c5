"""The schema: frozen pydantic models mirroring the groups of ``params.yaml`` one to one, every field with its
default, its valid range and a description. The defaults live here only (``params.yaml`` lists the same values, a
test checks it; ``docs/reference/configuration.md`` is generated from it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from rlhf_core.config.base import _Group
from rlhf_core.config.sizes import _ppo_size_problem
from rlhf_core.config.tricks import PRESETS, TrickOverrides, Tricks
from rlhf_core.stages import STAGE_LIST


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


class DataColumns(_Group):
    """Column names in the user's data files (OpenRLHF's input_key / output_key / chosen_key / rejected_key)."""

    prompt: str = Field("prompt", min_length=1, description="The prompt: text or a list of {role, content} messages.")
    response: str | None = Field(
        None, description="SFT: the answer (text or one assistant message); null: 'response' or 'completion'."
    )
    chosen: str = Field("chosen", min_length=1, description="RM: the preferred answer (or whole conversation).")
    rejected: str = Field("rejected", min_length=1, description="RM: the other answer (or whole conversation).")
    messages: str = Field(
        "messages",
        min_length=1,
        description="A whole conversation: SFT ends with the answer, prompts with a user turn.",
    )


class DataConfig(_Group):
    source: Literal["sim", "hh_rlhf", "files"] = Field(
        "sim",
        description="sim: built-in simulated assistant domain; hh_rlhf: Anthropic HH-RLHF file; files: your own "
        "SFT, RM and PPO files (formerly 'jsonl', still accepted).",
    )
    seed: int = Field(1234, description="Seed of the generator and of every split shuffle.")
    path: str | None = Field(None, description="hh_rlhf: one file of chosen/rejected transcripts (any file_format).")
    sft_file: str | None = Field(
        None, description="files: demonstrations {prompt, response|completion} or {messages} (train+val)."
    )
    rm_file: str | None = Field(
        None, description="files: preference pairs {prompt, chosen, rejected} or {chosen, rejected} (train+test)."
    )
    ppo_file: str | None = Field(None, description="files: prompts {prompt} or {messages} for PPO and evaluation.")
    file_format: Literal["auto", "jsonl", "json", "parquet", "hf_dataset"] = Field(
        "auto",
        description="auto: from the name (.jsonl[.gz], .json[.gz], .parquet; a directory: datasets' save_to_disk).",
    )
    columns: DataColumns = Field(default_factory=DataColumns, description="Column names in the data files.")
    splits: SplitSizes = Field(
        default_factory=SplitSizes,
        description="Split sizes; for file sources an upper bound, scaled down together when rows run short.",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row (file:line); skip: drop and count it."
    )
    max_prompt_chars: int = Field(4000, ge=1, description="Rows with a longer prompt are malformed.")
    max_response_chars: int = Field(2000, ge=1, description="Rows with a longer response are malformed.")
    max_prompt_tokens: int | None = Field(
        None,
        ge=4,
        description="Rows whose prompt tokenises longer are malformed; null: the longest prompt in the data, within "
        "the model's positions (recorded in stats.json).",
    )
    max_response_tokens: int | None = Field(
        None,
        ge=2,
        description="Rows whose response (+EOS) tokenises longer are malformed; also the generation cap; null: the "
        "longest response in the data, within the model's positions.",
    )
    sim: SimConfig = Field(default_factory=SimConfig, description="The simulated assistant domain.")

    @field_validator("source", mode="before")
    @classmethod
    def _old_source_name(cls, value):
        return "files" if value == "jsonl" else value  # the name before parquet and saved datasets were read

    @model_validator(mode="after")
    def _source_files(self) -> DataConfig:
        if self.source == "hh_rlhf" and not self.path:
            raise ValueError("data.source=hh_rlhf needs data.path (a .jsonl, .jsonl.gz, .parquet or saved dataset)")
        if self.source == "files" and not (self.sft_file and self.rm_file and self.ppo_file):
            raise ValueError("data.source=files needs data.sft_file, data.rm_file and data.ppo_file")
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


class SupervisedStageConfig(OptimizerConfig):
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


class SFTConfig(SupervisedStageConfig):
    epochs: float = Field(10.0, gt=0, description="Passes over the SFT split.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward pass on one process.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-3, gt=0, le=1, description="Peak learning rate; tiny models from scratch need ~1e-3.")
    num_sample_generations: int = Field(
        32, ge=0, description="Validation prompts answered greedily after training, saved as samples.jsonl."
    )


class RMConfig(SupervisedStageConfig):
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
    preset: Literal["vanilla", "moss_released", "ppo_max", "grpo", "rloo", "reinforce_pp"] = Field(
        "ppo_max",
        description="Trick preset; ppo.tricks.* and ppo.kl_coef override single switches. grpo, rloo and "
        "reinforce_pp are PPO-max without a critic (set ppo.samples_per_prompt >= 2 for grpo and rloo).",
    )
    tricks: TrickOverrides = Field(default_factory=TrickOverrides, description="Per-trick overrides of the preset.")
    steps: int = Field(150, ge=1, description="PPO iterations (rollout, then update), critic warm-up included.")
    rollout_size: int = Field(64, ge=1, description="Samples per experience buffer (paper: 128).")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Answers sampled per prompt: a rollout is rollout_size / samples_per_prompt prompts, each "
        "answered this many times. The group estimators (grpo, rloo) need at least 2.",
    )
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
    length_debias: bool = Field(
        False,
        description="Take each reward model's linear length term out of its score (the slope of score on response "
        "length that the rm stage fits on SFT samples, reward_stats.json 'length'), so that PPO earns nothing for "
        "answers longer or shorter than SFT's average; not in the paper.",
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


class EvalConfig(_Group):
    """Win-rate evaluation (paper sec. 6). Consumed by the `eval` stage."""

    seed: int = Field(7, description="Seed of generation and bootstrap.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Paper sec. 6.1 sampling.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for the 95% intervals.")
    rm_tie_margin: float = Field(
        0.0, ge=0, description="The RM judge calls a tie when the two scores differ by at most this much."
    )
    length_control_l2: float = Field(
        1.0,
        gt=0,
        description="L2 penalty on the length coefficient of the length-controlled win rate's logistic regression "
        "(per standard deviation of the length difference); keeps it finite when a judge's verdict is a perfect "
        "function of length.",
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
    bf16: bool | Literal["auto"] = Field(
        False,
        description="bfloat16 mixed precision (DeepSpeed bf16 / torch autocast). auto: on where the hardware does "
        "bf16 arithmetic natively (a CUDA GPU with bf16; a CPU for which torch's oneDNN reports bf16, i.e. "
        "AVX-512), float32 elsewhere: on a CPU with AVX2 only, a SmolLM2 training step took 31x as long under bf16 "
        "autocast as in float32 (docs/results/benchmarks.md).",
    )
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
    """Where each stage commits its outputs. A relative path is relative to the working directory and must stay
    inside it; an absolute path is taken as the user's explicit choice. No two stages share a directory or nest
    (checked before a stage works, by ``rlhf_core.preflight.check_output_paths``: the answer depends on where the
    run starts)."""


# One field per stage, from its declaration (rlhf_core/stages.py): a new stage gets its directory setting there.
PathsConfig = create_model(
    "PathsConfig",
    __base__=_PathsBase,
    **{
        stage.path_key: (str, Field(f"outputs/{stage.path_key}", min_length=1, description=stage.describe_outputs()))
        for stage in STAGE_LIST
    },
)


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
        # Derived limits (null) are known once `rlhf prepare` has read the data; each stage checks them then.
        if self.data.max_prompt_tokens is None or self.data.max_response_tokens is None:
            return self
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
        if self.data.max_prompt_tokens is None or self.data.max_response_tokens is None:
            return self  # derived within the positions
        total = self.data.max_prompt_tokens + self.data.max_response_tokens
        if self.model.name_or_path is None and total > self.model.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_tokens + data.max_response_tokens = {total} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        return self

"""Every stage of the pipeline, declared once.

A :class:`Stage` says what the stage is (its function and its output directory), what its outputs are a function of
(the config keys it reads, the files of earlier stages it reads, and, computed from its imports, the project code
it runs), what it writes, how it runs (on every process under torchrun or on rank 0; how often Prefect retries it)
and what its summary shows. Everything that needs to know about stages reads this table: the pipeline loop and its
skip rule (``pipeline``), the output-directory checks (``preflight``), ``rlhf run``'s summary (``cli``), the Prefect
tasks (``tasks/stages.py``), the benchmarks, and ``dvc.yaml``, which is generated from it (``rlhf dvc-yaml``; a
test fails when the file differs from what this table gives).

Adding a stage: write its function (``(config, staging directory, logger) -> StageResult``), add one
:class:`Stage` below in pipeline order, then ``make generated`` (``dvc.yaml`` and the configuration reference).
Its ``paths`` field, its ``rlhf <stage>`` command and its Prefect task come from the declaration.

The function is named by module and attribute and imported when the stage runs: this module is read by the
configuration (the ``paths`` fields) and by the CLI (one command per stage), and importing every trainer, torch
and transformers with them would make ``rlhf --help`` or a mistyped ``--set`` take seconds instead of a blink.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core import summary

if TYPE_CHECKING:
    from rlhf_core.config import Config

PROJECT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Output:
    """One file or folder a stage writes, as DVC tracks it (``path`` is relative to the stage's directory)."""

    path: str
    cached: bool = False  # kept in DVC's cache (models, splits); the rest stays small and visible to git
    plot: dict | None = None  # a DVC plot: {} for a whole file (an image), or its x / y / title


@dataclass(frozen=True)
class Plot:
    """A DVC plot drawing several columns of one of the stage's files (a stage's own plot entry takes one)."""

    name: str
    title: str
    file: str  # relative to the stage's directory
    x: str
    y: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    name: str  # as the CLI, DVC and Prefect call it
    help: str  # one line: what `rlhf <name>` does
    module: str  # where its function lives ...
    function: str  # ... and its name: (config, staging directory, logger) -> StageResult
    path_key: str  # the `paths` field holding its output directory (default outputs/<path_key>)
    params: tuple[str, ...]  # the config keys (or groups) its outputs depend on; its fingerprint and DVC params
    inputs: tuple[str, ...] = ()  # "<stage>/<path>": what it reads of earlier stages' outputs (or metrics file)
    outputs: tuple[Output, ...] = ()  # what it writes besides config.yaml and its metrics file
    plots: tuple[Plot, ...] = ()
    scratch: tuple[str, ...] = ()  # what it may leave in its directory that DVC does not track
    metrics_file: str = "metrics.json"  # what the scaffold writes (prepare writes stats.json itself)
    distributed: bool = False  # runs on every process under torchrun (the trainers); otherwise rank 0 only
    retries: int = 1  # Prefect retries: only where a retry is safe and cheap (see tasks/stages.py)
    summary: Callable[[dict, Config], list[tuple[str, str]]] = field(default=lambda metrics, config: [])

    def run(self, config: Config, staging: Path, logger):
        """The stage's own work (the scaffold, ``pipeline.run_stage``, runs it inside its commit)."""
        return getattr(importlib.import_module(self.module), self.function)(config, staging, logger)

    def output_dir(self, config: Config) -> str:
        return getattr(config.paths, self.path_key)

    def describe_outputs(self) -> str:
        """What its directory holds, for the ``paths`` field's description."""
        top = dict.fromkeys(Path(o.path).parts[0] + ("/" if "/" in o.path or o.cached else "") for o in self.outputs)
        return f"{self.name}: " + ", ".join([*top, self.metrics_file]) + "."

    @property
    def all_params(self) -> tuple[str, ...]:
        """Its params and what the scaffold reads around every stage (its fingerprint and dvc.yaml's params)."""
        covered = lambda key: any(key == p or key.startswith(p + ".") for p in self.params)  # noqa: E731
        return (*self.params, *(key for key in SCAFFOLD_PARAMS if not covered(key)))

    @property
    def upstream(self) -> tuple[str, ...]:
        """The earlier stages whose outputs it reads, in pipeline order."""
        named = {item.split("/", 1)[0] for item in self.inputs}
        return tuple(name for name in STAGES if name in named)

    @property
    def entries(self) -> set[str]:
        """What it may leave at the top of its directory (the scaffold's own files come on top)."""
        top = {Path(o.path).parts[0] for o in self.outputs} | set(self.scratch)
        return top | {self.metrics_file}


# The scaffold (pipeline.run_stage) runs every stage under bfloat16 autocast when distributed.bf16 is set.
SCAFFOLD_PARAMS = ("distributed.bf16",)
# Sampling settings PPO's end-of-run comparison reads from the eval stage's group (trainers/ppo/evaluation.py).
_PPO_EVALUATION = ("eval.sampling", "eval.seed")

STAGE_LIST = (
    Stage(
        name="prepare",
        help="Build the data splits, the tokenizer and stats.json (data.source: sim, hh_rlhf or jsonl).",
        module="rlhf_core.trainers.prepare",
        function="prepare_data",
        path_key="data",
        params=("data", "model.vocab_size", "model.name_or_path", "model.max_position_embeddings"),
        outputs=(Output("splits", cached=True), Output("tokenizer", cached=True)),
        metrics_file="stats.json",
        summary=summary.prepare_rows,
    ),
    Stage(
        name="sft",
        help="Supervised fine-tuning of the policy (torch or DeepSpeed ZeRO; torchrun for several processes).",
        module="rlhf_core.trainers.sft",
        function="train_sft",
        path_key="sft",
        params=("model", "sft", "distributed", "generation", "data.source", "data.seed", "data.max_response_tokens"),
        inputs=(
            "prepare/splits/sft_train.jsonl",
            "prepare/splits/sft_val.jsonl",
            "prepare/tokenizer",
            "prepare/stats.json",  # the split sizes its model card names
        ),
        outputs=(
            Output("model", cached=True),
            Output("samples.jsonl"),
            Output("plots/train.csv", plot={"x": "step", "y": "sft/loss", "title": "SFT training loss"}),
            Output("plots/val.csv", plot={"x": "step", "y": "sft/val_loss", "title": "SFT validation loss"}),
            Output("plots/sft_curves.png", plot={}),
        ),
        distributed=True,
        retries=0,  # keeps no mid-run state: a retry would silently redo the whole training
        summary=summary.sft_rows,
    ),
    Stage(
        name="rm",
        help="Train the reward model on preference pairs (eq. 2: ranking loss + beta_rm x LM loss on chosen).",
        module="rlhf_core.trainers.rm",
        function="train_reward_model",
        path_key="rm",
        params=(
            "rm",
            "model.lora",
            "distributed",
            "generation",
            "rm_eval.batch_size",
            "data.source",
            "data.seed",
            "data.max_response_tokens",
            "ppo.sampling",
        ),  # fmt: skip
        inputs=(
            "prepare/splits/rm_train.jsonl",
            "prepare/splits/ppo.jsonl",
            "prepare/tokenizer",
            "prepare/stats.json",
            "sft/model",
        ),
        outputs=(
            Output("model", cached=True),
            Output("checkpoints.json"),
            Output("plots/train.csv", plot={}),
            Output("plots/val.csv", plot={}),
            Output("plots/rm_curves.png", plot={}),
        ),
        plots=(
            Plot(
                "rm_training",
                "RM training: ranking loss and accuracy",
                "plots/train.csv",
                "step",
                ("rm/loss", "rm/accuracy"),
            ),
            Plot("rm_validation", "RM validation", "plots/val.csv", "step", ("rm/val_loss", "rm/val_accuracy")),
        ),  # fmt: skip
        distributed=True,
        retries=0,
        summary=summary.rm_rows,
    ),
    Stage(
        name="rm-eval",
        help="Evaluate the reward model on rm_test: accuracy vs annotator and gold labels, calibration, errors.",
        module="rlhf_core.trainers.rm_eval",
        function="evaluate_reward_model",
        path_key="rm_eval",
        params=("rm_eval", "data.source", "data.seed", "data.sim"),
        inputs=("prepare/splits/rm_test.jsonl", "prepare/tokenizer", "rm/model", "rm/checkpoints.json"),
        outputs=(
            Output("pair_scores.jsonl"),
            Output("confident_errors.md"),
            Output("confident_errors.jsonl"),
            Output("plots/score_gaps.csv", plot={}),
            Output("plots/calibration.csv", plot={}),
            Output("plots/score_gaps.png", plot={}),
            Output("plots/calibration.png", plot={}),
        ),
        plots=(
            Plot(
                "rm_score_gaps",
                "RM score gaps on rm_test (paper fig. 2)",
                "plots/score_gaps.csv",
                "score_gap",
                ("gold_prefers_chosen", "gold_prefers_rejected"),
            ),
            Plot(
                "rm_calibration",
                "RM calibration: observed frequency against predicted confidence",
                "plots/calibration.csv",
                "annotator_confidence",
                ("annotator_accuracy", "gold_accuracy"),
            ),
        ),  # fmt: skip
        summary=summary.rm_eval_rows,
    ),
    Stage(
        name="ppo",
        help="PPO-max against the reward model (ppo.preset: vanilla, moss_released, ppo_max; ppo.tricks.* override).",
        module="rlhf_core.trainers.ppo",
        function="train_ppo",
        path_key="ppo",
        params=(
            "ppo",
            "model.lora",
            "distributed",
            "generation",
            "data.source",
            "data.seed",
            "data.sim",
            "data.max_response_tokens",
            *_PPO_EVALUATION,
        ),  # fmt: skip
        inputs=(
            "prepare/splits/ppo.jsonl",
            "prepare/splits/sft_train.jsonl",
            "prepare/tokenizer",
            "prepare/stats.json",
            "sft/model",
            "rm/model",
        ),  # fmt: skip
        outputs=(
            Output("model", cached=True),
            Output("samples.jsonl"),
            Output("tricks.json"),
            Output("plots/train.csv", plot={}),
            Output("plots/ppo_curves.png", plot={}),
        ),
        plots=(
            Plot(
                "ppo_collapse_signals",
                "PPO: RM score, gold score, KL, length, perplexity (paper fig. 4)",
                "plots/train.csv",
                "step",
                (
                    "objective/scores",
                    "monitor/gold_score",
                    "objective/kl",
                    "rollout/response_length",
                    "monitor/ppl_policy",
                ),
            ),
        ),  # fmt: skip
        scratch=("checkpoints",),  # resumable state, cleared by the run's commit; not a result
        distributed=True,
        retries=1,  # resumes from its newest checkpoint, so a retry continues rather than restarts
        summary=summary.ppo_rows,
    ),
    Stage(
        name="eval",
        help="Win rate of the PPO policy against the SFT policy, judged by the gold judge and the reward model.",
        module="rlhf_core.trainers.eval",
        function="evaluate_win_rate",
        path_key="eval",
        params=("eval", "generation", "data.source", "data.seed", "data.sim", "data.max_response_tokens"),
        inputs=("prepare/splits/eval.jsonl", "prepare/tokenizer", "sft/model", "rm/model", "ppo/model"),
        outputs=(Output("pairs.jsonl"), Output("examples.md"), Output("plots/win_rates.png", plot={})),
        summary=summary.eval_rows,
    ),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in STAGE_LIST}  # pipeline order


def output_dir(config: Config, stage: str) -> str:
    return STAGES[stage].output_dir(config)


def input_path(config: Config, item: str) -> Path:
    """Where ``"<stage>/<path>"`` (a :attr:`Stage.inputs` item) lies under ``config``'s paths."""
    stage, path = item.split("/", 1)
    return Path(output_dir(config, stage)) / path


# ------------------------------------------------------------------------------------- the code a stage runs
# The code a stage's outputs are a function of: its function's module and the scaffold that runs it, with every
# project module they import, at any depth and inside functions too. Not followed: this table (it imports every
# stage), and modules that cannot change an output: where metrics are logged, how errors read, the disk checks
# made before work and the summary's wording. Both the skip rule's fingerprint and dvc.yaml hash exactly these
# files, and a test runs every stage recording the project code it executes and fails if any lies outside them.
SCAFFOLD = ("rlhf_core.pipeline",)
NOT_FOLLOWED = frozenset(
    {"rlhf_core.stages", "rlhf_core.tracking", "rlhf_core.errors", "rlhf_core.preflight", "rlhf_core.summary"}
)


def _module_file(module: str) -> Path | None:
    base = PROJECT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """The project modules one file imports (``from rlhf_core.x import y`` counts ``rlhf_core.x.y`` when that is a
    module), with the packages they sit in. The project uses absolute imports only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rlhf_core" and _module_file(name) is not None:
                parts = name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


@functools.cache
def code_modules(stage: str) -> tuple[str, ...]:
    """The project modules ``stage``'s outputs are a function of (see above), sorted."""
    start = [STAGES[stage].module, *SCAFFOLD]
    seen: set[str] = set()
    while start:
        module = start.pop()
        if module in seen or module in NOT_FOLLOWED:
            continue
        seen.add(module)
        start.extend(_imported_modules(_module_file(module)))
    return tuple(sorted(seen))


def code_files(stage: str) -> list[str]:
    """:func:`code_modules` as project-relative file paths (what dvc.yaml lists as the stage's code deps)."""
    return sorted(str(_module_file(m).relative_to(PROJECT)) for m in code_modules(stage))


def code_digest(stage: str) -> str:
    """SHA-256 over the stage's code files, names and contents (the fingerprint's ``code``)."""
    digest = hashlib.sha256()
    for name in code_files(stage):
        digest.update(name.encode() + (PROJECT / name).read_bytes())
    return digest.hexdigest()

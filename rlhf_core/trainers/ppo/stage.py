"""The `ppo` stage: PPO-max (paper sec. 5), every trick a switch (``ppo.preset`` + ``ppo.tricks``).

Each iteration is ``iteration.ppo_iteration``: rollout, score, reward processing + KL shaping + GAE, then
``ppo.epochs`` x minibatches of updates (critic warm-up first). Around it this module resumes from and writes
checkpoints, watches for collapse, keeps a sample table, and at the end saves the policy and compares it with
the SFT policy on held-out prompts.

Outputs (in the directory the stage scaffold gives it, committed to ``paths.ppo``): ``model/`` (the final
policy, a Hugging Face causal-LM directory with its model card), ``tricks.json`` (the resolved switches),
``samples.jsonl`` (a sample table every ``ppo.monitor.sample_every`` iterations) and ``plots/`` (CSV for DVC and the
PNG of the paper's collapse signals); the scaffold adds ``metrics.json`` and ``config.yaml``. Checkpoints live in
``paths.ppo/checkpoints/`` (work in progress, not a committed output).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.checkpoint import (
    CheckpointError,
    config_fingerprint,
    load_checkpoint,
    resume_latest,
    rng_state,
    save_checkpoint,
    set_aside_others,
)
from rlhf_core.config import Config
from rlhf_core.errors import RLHFError
from rlhf_core.io import atomic_write_json, atomic_write_jsonl
from rlhf_core.model_card import write_model_card
from rlhf_core.models.lora import is_lora, save_causal_lm
from rlhf_core.tracking import Logger
from rlhf_core.trainers.ppo.evaluation import compare_on_eval_prompts, final_metrics, write_plots
from rlhf_core.trainers.ppo.experience import Experience
from rlhf_core.trainers.ppo.iteration import PPORun, ppo_iteration, start_run
from rlhf_core.trainers.results import StageResult

SAMPLES_PER_TABLE = 4


def train_ppo(config: Config, out: Path, logger: Logger) -> StageResult:
    """Optimise the SFT policy against the reward model with PPO (preset and tricks from ``config.ppo``)."""
    ppo = config.ppo
    ctx = distributed.setup(config.distributed)
    checkpoint_root = Path(config.paths.ppo) / "checkpoints"
    run = start_run(config, ctx, checkpoint_root)
    run.mlflow_run_id = logger.run_id
    fingerprint = _resume_fingerprint(config)
    start, history, samples, latest = _resume(run, checkpoint_root, fingerprint)
    run.start_ptx(start)
    logger.log_params({f"ppo.resolved.{k}": v for k, v in run.tricks.model_dump().items()})
    if start:
        _continue_the_record(logger, run, start, history, latest)
    progress = tqdm(range(start, ppo.steps), desc="ppo", disable=not ctx.is_main, dynamic_ncols=True,
                    mininterval=2.0, initial=start, total=ppo.steps)  # fmt: skip
    done = _Completed.take(run, start, history, samples)
    stopped_early = False
    try:
        for step in progress:
            record, exp = ppo_iteration(run, step)
            reasons = run.monitor.observe(step + 1, record)
            if reasons:
                _report_collapse(run, reasons, step + 1, logger)
            history.append(record)
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step + 1)
            if (step + 1) % ppo.monitor.sample_every == 0 or step == start:
                samples += _sample_table(exp, step + 1)
            progress.set_postfix(score=f"{record['objective/scores']:.2f}", kl=f"{record['objective/kl']:.2f}",
                                 len=f"{record['rollout/response_length']:.0f}")  # fmt: skip
            done = _Completed.take(run, step + 1, history, samples)
            if reasons and ppo.monitor.stop_on_collapse:
                stopped_early = True
                break
            if (step + 1) % ppo.checkpoint.every == 0 and step + 1 < ppo.steps:
                state = done.state(history, samples)
                latest = save_checkpoint(checkpoint_root, step + 1, run.models.engines, state, ctx, fingerprint,
                                         config=_resume_config(config))  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the CLI raises it
        if ctx.world_size == 1:  # with several processes the others may be anywhere: no collective save
            _checkpoint_interrupted(run, done, latest, history, samples, checkpoint_root, fingerprint)
        raise
    if stopped_early and latest is not None:
        load_checkpoint(latest, {"policy": run.models.policy}, ctx)  # keep the last healthy policy
    return _finish(run, out, history, samples, stopped_early, logger)


# Everything that shapes the run except where it logs, how long it runs and when it stops.
_NOT_RESUMED_BY = {"tracking": True, "ppo": {"steps": True, "checkpoint": {"resume"}, "monitor": {"stop_on_collapse"}}}


def _resume_fingerprint(config: Config) -> str:
    """A checkpoint is resumed only by the configuration that wrote it: this is its fingerprint."""
    return config_fingerprint(config.model_dump(exclude=_NOT_RESUMED_BY))


def _resume_config(config: Config) -> dict:
    """What the fingerprint hashes, as JSON data: checkpoints record it, so a run of another configuration can
    name the settings that differ."""
    return config.model_dump(mode="json", exclude=_NOT_RESUMED_BY)


def _resume(run: PPORun, root: Path, fingerprint: str) -> tuple[int, list[dict], list[dict], Path | None]:
    """(first iteration, history, samples, checkpoint resumed from): from the newest intact checkpoint of this
    configuration when ``ppo.checkpoint.resume`` is auto (another configuration's are moved aside, not deleted),
    else a fresh start that deletes every checkpoint, those set aside included."""
    if run.config.ppo.checkpoint.resume == "auto":
        if run.ctx.is_main:
            set_aside_others(root, fingerprint, _resume_config(run.config), _warn)
        distributed.barrier()
        found = _resume_newest(run, root, fingerprint)
        return found if found is not None else (0, [], [], None)
    if run.ctx.is_main and root.exists():
        shutil.rmtree(root)  # resume=never: nothing of them may be resumed later
    distributed.barrier()
    return 0, [], [], None


def _warn(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def _resume_newest(run: PPORun, root: Path, fingerprint: str) -> tuple[int, list[dict], list[dict], Path] | None:
    """Resume the newest intact checkpoint, reporting (not deleting) each newer damaged one in one line; None when
    this configuration has none; RLHFError when it has some and none can be resumed."""

    def report(problem: str) -> None:  # every rank finds the same problems; rank 0 says them
        if run.ctx.is_main:
            tqdm.write(f"ppo: not resuming {problem}", file=sys.stderr)

    try:
        found = resume_latest(root, fingerprint, run.models.engines, run.ctx, lambda s: _restore(run, s), report)
    except CheckpointError as exc:
        raise RLHFError(f"ppo: {exc}; `--set ppo.checkpoint.resume=never` starts afresh (and deletes them)") from None
    if found is None:
        return None
    path, state = found
    previous = state.get("mlflow_run_id")
    run.resumed_from_run_id = previous if isinstance(previous, str) else None
    if run.ctx.is_main:
        tqdm.write(f"ppo: resumed from {path} (step {state['step']})")
    return state["step"], state["history"], state["samples"], path


def _restore(run: PPORun, state: dict) -> None:
    """Give the run's own objects their checkpointed state (only the keys they save: a loaded file sets no other
    attribute)."""
    if not isinstance(state["history"], list) or not isinstance(state["samples"], list):
        raise ValueError("history and samples must be lists")
    run.moments.load_state_dict(state["moments"])
    run.kl_controller.load_state_dict(state["kl_controller"])
    run.monitor.load_state_dict({k: state["monitor"][k] for k in run.monitor.state_dict()})
    run.guard.load_state_dict(state["guard"])


def _trainer_state(run: PPORun) -> dict:
    return {
        "moments": run.moments.state_dict(),
        "kl_controller": run.kl_controller.state_dict(),
        "monitor": run.monitor.state_dict(),
        "guard": run.guard.state_dict(),
        "mlflow_run_id": run.mlflow_run_id,
    }


def _continue_the_record(logger: Logger, run: PPORun, start: int, history: list[dict], checkpoint: Path) -> None:
    """A resumed run's MLflow record holds the whole curve, not only the iterations after ``start``: the
    checkpoint's history is logged again at its own steps, and tags link the run it continues."""
    tags = {"resumed_from_step": start, "resumed_from_checkpoint": checkpoint}
    if run.resumed_from_run_id:
        tags["resumed_from_run"] = run.resumed_from_run_id
    logger.set_tags(tags)
    for record in history:
        logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))


@dataclass(frozen=True)
class _Completed:
    """The trainer state after the last completed iteration (plain data, RNG states included) and how many
    micro-batches each engine had stepped then. An interrupt arrives anywhere in the next iteration, after its
    sampling has drawn from the RNGs and its scoring has moved the moments: this is what a checkpoint of the
    completed iteration must hold, and its engines are still that iteration's while their counts are unchanged."""

    step: int
    trainer: dict
    history_len: int
    samples_len: int
    engine_steps: tuple[int, ...]

    @classmethod
    def take(cls, run: PPORun, step: int, history: list[dict], samples: list[dict]) -> _Completed:
        trainer = {**_trainer_state(run), "rng": rng_state()}
        return cls(step, trainer, len(history), len(samples), _engine_steps(run))

    def state(self, history: list[dict], samples: list[dict]) -> dict:
        """The checkpoint's trainer state (history and samples only grow, so their first entries are this one's)."""
        return {"step": self.step, "history": history[: self.history_len], "samples": samples[: self.samples_len],
                **self.trainer}  # fmt: skip


def _engine_steps(run: PPORun) -> tuple[int, ...]:
    """Micro-batches each training engine has stepped (unchanged since a checkpoint: the weights are its)."""
    return tuple(engine.micro_steps for engine in run.models.engines.values())


def _checkpoint_interrupted(
    run: PPORun, done: _Completed, latest: Path | None, history: list, samples: list, root: Path, fingerprint: str
) -> None:
    """After Ctrl-C or SIGTERM (one process): checkpoint the last completed iteration unless a checkpoint holds it
    already or an engine has stepped since (the interrupt came inside an update: those weights belong to no
    iteration), and say in one line how to go on. A second interrupt during the save leaves at most a temporary
    folder: the checkpoint appears by one rename when complete."""
    saved = int(latest.name.split("-")[-1]) if latest is not None else 0
    head = f"ppo: interrupted at iteration {done.step}"
    if done.step > saved and _engine_steps(run) != done.engine_steps:
        head = f"ppo: interrupted inside the update of iteration {done.step + 1}, which no checkpoint can hold"
    elif done.step > saved:
        try:
            state = done.state(history, samples)
            latest = save_checkpoint(root, done.step, run.models.engines, state, run.ctx, fingerprint,
                                     config=_resume_config(run.config))  # fmt: skip
            saved = done.step
        except Exception as exc:  # a full disk must not turn a clean stop into a traceback
            head += f", not checkpointed ({type(exc).__name__}: {''.join(str(exc).splitlines()[:1])})"
    if latest is None:
        tail = "no checkpoint yet; rerun the same command to start again"
    else:
        tail = f"checkpoint {latest}" + ("" if saved == done.step else f" (iteration {saved})")
        tail += "; rerun the same command to resume"
    tqdm.write(f"{head}; {tail}", file=sys.stderr)


def _report_collapse(run: PPORun, reasons: list[str], iteration: int, logger: Logger) -> None:
    if run.monitor.warnings == 1:
        logger.set_tags({"collapse_warning": run.monitor.first})
    if run.ctx.is_main:
        tqdm.write(f"ppo: collapse warning at iteration {iteration}: {'; '.join(reasons)}")


def _sample_table(exp: Experience, iteration: int) -> list[dict]:
    return [
        {
            "step": iteration,
            "prompt": exp.prompts[j],
            "response": exp.texts[j],
            "score": float(exp.scores[j]),
            **({"gold_score": exp.gold_scores[j]} if exp.gold_scores is not None else {}),
        }
        for j in range(min(SAMPLES_PER_TABLE, len(exp.prompts)))
    ]


def _finish(
    run: PPORun, out: Path, history: list[dict], samples: list[dict], stopped_early: bool, logger: Logger
) -> StageResult:
    """Save the policy, compare it with the SFT policy on the eval prompts, write the outputs."""
    models, ctx = run.models, run.ctx
    policy = models.policy.unwrapped()
    state = None if is_lora(policy) else distributed.gather_full_state_dict(models.policy)
    metrics: dict = {}
    if ctx.is_main:
        save_causal_lm(policy, state, run.tokenizer, out / "model")
    if ctx.is_main or models.sharded:
        # Sharded models answer only when every rank runs the same forwards: then every rank evaluates the same
        # prompts from the same seed (what rank 0 alone computes otherwise), and rank 0 reports.
        comparison = compare_on_eval_prompts(run.config, models, run.tokenizer, run.judge)
    if ctx.is_main:
        metrics = final_metrics(history, run.monitor.warnings, stopped_early, comparison)
        tricks = {
            "preset": run.config.ppo.preset,
            **run.tricks.model_dump(),
            "first_collapse_warning": run.monitor.first,
        }
        atomic_write_json(out / "tricks.json", tricks)
        write_model_card(out / "model", run.config, "ppo", metrics, tricks)
        atomic_write_jsonl(out / "samples.jsonl", samples)
        warmup = run.config.ppo.critic_warmup_steps if run.tricks.critic_warmup else 0
        write_plots(out / "plots", history, run.config.ppo.preset, warmup)
        logger.register_model(out / "model", run.config.tracking.registered_model)
    distributed.barrier()
    adapter = {"adapter": "adapter"} if is_lora(policy) else {}
    return StageResult(
        metrics=metrics,
        artifacts={"model": "model", **adapter, "metrics": "metrics.json"},
        logged=("tricks.json", "samples.jsonl", "plots"),
        history=history,
    )

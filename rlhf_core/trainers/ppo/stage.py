"""The `ppo` stage: PPO-max (paper sec. 5), every trick a switch (``ppo.preset`` + ``ppo.tricks``).

Each iteration is ``iteration.ppo_iteration``: rollout, score, reward processing + KL shaping + GAE, then
``ppo.epochs`` x minibatches of updates (critic warm-up first). Around it this module resumes from and writes
checkpoints, watches for collapse, keeps a sample table, and at the end saves the policy and compares it with
the SFT policy on held-out prompts.

Outputs (in the directory the stage scaffold gives it, committed to ``paths.ppo``): ``model/`` (the final
policy, a Hugging Face causal-LM directory), ``tricks.json`` (the resolved switches), ``samples.jsonl`` (a sample
table every ``ppo.monitor.sample_every`` iterations) and ``plots/`` (CSV for DVC and the PNG of the paper's
collapse signals); the scaffold adds ``metrics.json`` and ``config.yaml``. Checkpoints live in
``paths.ppo/checkpoints/`` (work in progress, not a committed output).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from rlhf_core import distributed
from rlhf_core.checkpoint import config_fingerprint, list_checkpoints, load_checkpoint, save_checkpoint
from rlhf_core.config import Config
from rlhf_core.io import atomic_write_json, atomic_write_jsonl
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
    fingerprint = _resume_fingerprint(config)
    start, history, samples = _resume(run, checkpoint_root, fingerprint)
    run.start_ptx(start)
    logger.log_params({f"ppo.resolved.{k}": v for k, v in run.tricks.model_dump().items()})
    progress = tqdm(range(start, ppo.steps), desc="ppo", disable=not ctx.is_main, dynamic_ncols=True,
                    mininterval=2.0, initial=start, total=ppo.steps)  # fmt: skip
    stopped_early = False
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
        if reasons and ppo.monitor.stop_on_collapse:
            stopped_early = True
            break
        if (step + 1) % ppo.checkpoint.every == 0 and step + 1 < ppo.steps:
            state = {"step": step + 1, "history": history, "samples": samples, **_trainer_state(run)}
            save_checkpoint(checkpoint_root, step + 1, run.models.engines, state, ctx, fingerprint)
    if stopped_early:
        healthy = list_checkpoints(checkpoint_root, fingerprint)
        if healthy:
            load_checkpoint(healthy[-1], {"policy": run.models.policy}, ctx)  # keep the last healthy policy
    return _finish(run, out, history, samples, stopped_early, logger)


def _resume_fingerprint(config: Config) -> str:
    """Everything that shapes the run except where it logs, how long it runs and when it stops: a checkpoint is
    resumed only by the configuration that wrote it."""
    ppo_excluded = {"steps": True, "checkpoint": {"resume"}, "monitor": {"stop_on_collapse"}}
    return config_fingerprint(config.model_dump(exclude={"tracking": True, "ppo": ppo_excluded}))


def _resume(run: PPORun, root: Path, fingerprint: str) -> tuple[int, list[dict], list[dict]]:
    """(first iteration, history, samples): from the newest checkpoint of this configuration when
    ``ppo.checkpoint.resume`` is auto, else a fresh start that clears stale checkpoints."""
    existing = list_checkpoints(root, fingerprint) if run.config.ppo.checkpoint.resume == "auto" else []
    if not existing:
        if run.ctx.is_main and root.exists():
            shutil.rmtree(root)  # a fresh run: stale checkpoints of another run must not be resumed later
        distributed.barrier()
        return 0, [], []
    state = load_checkpoint(existing[-1], run.models.engines, run.ctx)
    run.moments.load_state_dict(state["moments"])
    run.kl_controller.load_state_dict(state["kl_controller"])
    run.monitor.load_state_dict(state["monitor"])
    run.guard.load_state_dict(state["guard"])
    if run.ctx.is_main:
        tqdm.write(f"ppo: resumed from {existing[-1]} (step {state['step']})")
    return state["step"], state["history"], state["samples"]


def _trainer_state(run: PPORun) -> dict:
    return {
        "moments": run.moments.state_dict(),
        "kl_controller": run.kl_controller.state_dict(),
        "monitor": run.monitor.state_dict(),
        "guard": run.guard.state_dict(),
    }


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
        atomic_write_jsonl(out / "samples.jsonl", samples)
        write_plots(out / "plots", history)
        logger.register_model(out / "model", run.config.tracking.registered_model)
    distributed.barrier()
    adapter = {"adapter": "adapter"} if is_lora(policy) else {}
    return StageResult(
        metrics=metrics,
        artifacts={"model": "model", **adapter, "metrics": "metrics.json"},
        logged=("tricks.json", "samples.jsonl", "plots"),
        history=history,
    )

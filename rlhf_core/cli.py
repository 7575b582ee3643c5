"""The ``rlhf`` command's stage subcommands (what ``dvc.yaml`` and ``torchrun -m rlhf_core.cli`` call), and the
pipeline summary ``rlhf run`` prints. ``rlhf run`` itself lives in ``flows/cli.py``: it can start the Prefect flow,
and nothing in ``rlhf_core`` imports ``flows``.

Every subcommand takes ``--params FILE`` and repeated ``--set group.key=value``; configuration and data errors
print one line naming the problem and exit with status 2 (config) or 1 (data), before any work is lost.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rlhf_core.env import apply_defaults
from rlhf_core.errors import ConfigError, RLHFError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RLHF with PPO-max: stages and pipeline.")
console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: group.key=value (repeatable).")]


def fail(exc: RLHFError) -> None:
    """One line naming the problem, exit status 2 for configuration errors and 1 for the rest."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def load(params: Path, overrides: list[str] | None):
    from rlhf_core.config import load_config

    return load_config(params, overrides or [])


def _run_single(stage: str, params: Path, overrides: list[str] | None) -> None:
    apply_defaults()
    try:
        config = load(params, overrides)
        from rlhf_core.pipeline import run_stage

        artifacts = run_stage(stage, config).artifacts
    except RLHFError as exc:
        fail(exc)
        return
    finally:
        from rlhf_core import distributed

        distributed.shutdown()
    _print_artifacts(stage, artifacts, config)


def _print_artifacts(stage: str, artifacts: dict[str, str], config) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(f"[bold green]{stage} done[/]")
    for name, path in artifacts.items():
        console.print(f"  {name}: {path}", highlight=False)
    if config.tracking.enabled:
        console.print(
            f"  MLflow: {config.tracking.uri} (mlflow ui --backend-store-uri {config.tracking.uri} --host 127.0.0.1)",
            highlight=False,
        )


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Build the data splits, the tokenizer and stats.json (data.source: sim, hh_rlhf or jsonl)."""
    _run_single("prepare", params, set_)


@app.command()
def sft(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Supervised fine-tuning of the policy (torch or DeepSpeed ZeRO; torchrun for several processes)."""
    _run_single("sft", params, set_)


@app.command()
def rm(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the reward model on preference pairs (eq. 2: ranking loss + beta_rm x LM loss on chosen)."""
    _run_single("rm", params, set_)


@app.command("rm-eval")
def rm_eval(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Evaluate the reward model on rm_test: accuracy vs annotator and gold labels, calibration, errors."""
    _run_single("rm-eval", params, set_)


@app.command()
def ppo(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """PPO-max against the reward model (ppo.preset: vanilla, moss_released, ppo_max; ppo.tricks.* override)."""
    _run_single("ppo", params, set_)


@app.command("eval")
def eval_(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Win rate of the PPO policy against the SFT policy, judged by the gold judge and the reward model."""
    _run_single("eval", params, set_)


def print_summary(config, outputs: dict, seconds: float, prefect: bool) -> None:
    """The table ``rlhf run`` ends with: each stage's headline numbers and where its outputs are."""
    from rlhf_core.io import read_json

    out = Console()
    table = Table(title=f"RLHF pipeline summary ({seconds:.0f} s)", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    stats_path = Path(config.paths.data) / "stats.json"
    if "prepare" in outputs and stats_path.is_file():
        stats = read_json(stats_path)
        table.add_row("data source", stats["source"])
        table.add_row("split sizes", ", ".join(f"{k} {v}" for k, v in stats["counts"].items()))
        if "annotator_gold_agreement" in stats:
            table.add_row("annotator-gold agreement", f"{stats['annotator_gold_agreement']['overall']:.1%}")
            demo = stats["demonstrator"]
            table.add_row(
                "demonstrations",
                f"{demo['sft_flawless_rate']:.1%} flawless, mean gold score {demo['sft_mean_gold_score']:.2f}",
            )
    metrics_path = Path(config.paths.sft) / "metrics.json"
    if "sft" in outputs and metrics_path.is_file():
        metrics = read_json(metrics_path)
        table.add_row("SFT validation loss / perplexity", f"{metrics['sft/val_loss']:.3f} / {metrics['sft/ppl']:.2f}")
        if "sft/sample_gold_score" in metrics:
            table.add_row(
                "SFT greedy samples (gold judge)",
                f"mean {metrics['sft/sample_gold_score']:.2f} of 2.00, "
                f"{metrics['sft/sample_flawless_rate']:.1%} flawless",
            )
    rm_path = Path(config.paths.rm) / "metrics.json"
    if "rm" in outputs and rm_path.is_file():
        metrics = read_json(rm_path)
        table.add_row(
            "RM validation accuracy (best step)",
            f"{metrics['rm/val_accuracy']:.1%} (step {metrics['rm/best_step']} of {metrics['rm/steps']})",
        )
        table.add_row(
            "RM score on SFT samples", f"mean {metrics['rm/reward_mean']:.2f}, std {metrics['rm/reward_std']:.2f}"
        )
    rm_eval_path = Path(config.paths.rm_eval) / "metrics.json"
    if "rm-eval" in outputs and rm_eval_path.is_file():
        metrics = read_json(rm_eval_path)
        line = (
            f"{metrics['rm_eval/accuracy']:.1%} vs annotators "
            f"[{metrics['rm_eval/accuracy_ci_low']:.1%}, {metrics['rm_eval/accuracy_ci_high']:.1%}]"
        )
        if "rm_eval/gold_accuracy" in metrics:
            line += (
                f", {metrics['rm_eval/gold_accuracy']:.1%} vs gold "
                f"[{metrics['rm_eval/gold_accuracy_ci_low']:.1%}, {metrics['rm_eval/gold_accuracy_ci_high']:.1%}]"
                f"; annotator-gold agreement {metrics['rm_eval/annotator_gold_agreement']:.1%}"
            )
        table.add_row("RM test accuracy (95% CI)", line)
    ppo_path = Path(config.paths.ppo) / "metrics.json"
    if "ppo" in outputs and ppo_path.is_file():
        m = read_json(ppo_path)
        line = (
            f"RM score {m['ppo/objective_scores']:.2f}, KL {m['ppo/objective_kl']:.2f}, "
            f"length {m['ppo/rollout_response_length']:.1f}, collapse warnings {m['ppo/collapse_warnings']}"
        )
        if "ppo/monitor_gold_score" in m:
            line += f", gold score {m['ppo/monitor_gold_score']:.2f}"
        table.add_row(f"PPO ({config.ppo.preset}), last iterations", line)
    eval_path = Path(config.paths.eval) / "metrics.json"
    if "eval" in outputs and eval_path.is_file():
        m = read_json(eval_path)
        for judge in ("gold", "rm"):
            if f"eval/{judge}/win_rate" in m:
                table.add_row(
                    f"PPO vs SFT, {judge} judge: win / tie / lose",
                    f"{m[f'eval/{judge}/win']:.1%} / {m[f'eval/{judge}/tie']:.1%} / {m[f'eval/{judge}/lose']:.1%}; "
                    f"win rate {m[f'eval/{judge}/win_rate']:.1%} [{m[f'eval/{judge}/win_rate_ci_low']:.1%}, "
                    f"{m[f'eval/{judge}/win_rate_ci_high']:.1%}]",
                )
        if "eval/overoptimisation_gap" in m:
            table.add_row("over-optimisation (RM minus gold win rate)", f"{m['eval/overoptimisation_gap']:+.1%}")
        if "eval/gold/cleanup_ceiling" in m:
            table.add_row("gold clean-up ceiling (SFT answers, flaws fixed)", f"{m['eval/gold/cleanup_ceiling']:.1%}")
    for stage, artifacts in outputs.items():
        for name, path in artifacts.items():
            table.add_row(f"{stage}: {name}", str(path))
    if config.tracking.enabled:
        table.add_row("MLflow", f"mlflow ui --backend-store-uri {config.tracking.uri} --host 127.0.0.1")
    if prefect:
        table.add_row("Prefect", "flow 'rlhf' (see README: prefect server start --host 127.0.0.1)")
    out.print(table)


def main() -> None:
    try:
        app()
    except RLHFError as exc:  # pragma: no cover - safety net for errors raised outside commands
        console.print(f"error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()

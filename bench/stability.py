"""Stability of PPO-max against the paper's claims: presets and single-trick ablations, several seeds each.

    .venv/bin/python bench/stability.py                      # 7 configurations x 3 seeds, ~5 min per run
    .venv/bin/python bench/stability.py --configs ppo_max vanilla --seeds 42
    # the long run (paper figs. 4/5 over ~1,000 iterations): its own runs, results and curves
    .venv/bin/python bench/stability.py --configs vanilla ppo_max --seeds 42 --steps 1000 \
        --out outputs/bench/long/runs --results bench/results/long_run.json

Every run shares the default data, SFT policy and reward model (built once under ``--base`` if missing, or
reused from a finished ``make run`` with ``--base outputs``); a seed changes PPO's rollouts and minibatch order.
Each run trains PPO for the default number of steps and then runs the win-rate evaluation against the SFT policy.
A finished run is kept in ``<out>/<config>_s<seed>/result.json`` and skipped when the benchmark is run again, so
an interrupted benchmark resumes (PPO itself resumes from its last checkpoint). Writes
``bench/results/stability.json`` and ``stability_curves.png`` (the paper's figures 4, 5 and 14: reward score,
KL, response length and perplexity per step), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Name -> overrides on top of the default params.yaml. The ablations switch one PPO-max trick off at a time.
CONFIGS: dict[str, list[str]] = {
    "vanilla": ["ppo.preset=vanilla"],
    "moss_released": ["ppo.preset=moss_released"],
    "ppo_max": ["ppo.preset=ppo_max"],
    "ppo_max-no_reward_norm": ["ppo.preset=ppo_max", "ppo.tricks.reward_norm=false"],
    "ppo_max-no_kl_penalty": ["ppo.preset=ppo_max", "ppo.tricks.kl_penalty=false"],
    "ppo_max-no_critic_warmup": ["ppo.preset=ppo_max", "ppo.tricks.critic_warmup=false"],
    "ppo_max-no_value_clip": ["ppo.preset=ppo_max", "ppo.tricks.value_loss_clip=false"],
}
DEFAULT_SEEDS = (42, 1, 2)
SMOOTHING = 10  # iterations in the plot's moving average
# Curves of the paper's figures 4, 5 and 14 (train.csv columns), with the gold score the paper cannot have.
CURVES = {
    "objective/scores": "reward-model score",
    "monitor/gold_score": "gold score (hidden judge)",
    "objective/kl": "KL to SFT (nats / response)",
    "rollout/response_length": "response length (tokens)",
    "monitor/ppl_policy": "policy perplexity",
    "rollout/repetition": "repeated 3-grams (share)",
}


def base_overrides(base: Path) -> list[str]:
    return ["tracking.enabled=false", *(f"paths.{name}={base / name}" for name in ("data", "sft", "rm"))]


def build_base(base: Path) -> None:
    """Data, SFT policy and reward model of the default config, unless a previous run left them there."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    config = load_config(REPO / "params.yaml", base_overrides(base))
    for stage, marker in (
        ("prepare", base / "data" / "stats.json"),
        ("sft", base / "sft" / "model" / "config.json"),
        ("rm", base / "rm" / "model" / "config.json"),
    ):
        if marker.is_file():
            print(f"[base] {stage}: reusing {marker.parent}")
            continue
        print(f"[base] {stage}: building")
        run_stage(stage, config)


def run_one(name: str, seed: int, base: Path, out: Path, extra: list[str] = ()) -> dict:
    from rlhf_core.config import load_config
    from rlhf_core.io import atomic_write_json
    from rlhf_core.pipeline import run_stage

    run_dir = out / f"{name}_s{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    overrides = [
        *base_overrides(base),
        *CONFIGS[name],
        *extra,
        f"ppo.seed={seed}",
        f"paths.ppo={run_dir / 'ppo'}",
        f"paths.eval={run_dir / 'eval'}",
    ]
    config = load_config(REPO / "params.yaml", overrides)
    started = time.time()
    ppo = run_stage("ppo", config).metrics
    ppo_seconds = time.time() - started
    evaluation = run_stage("eval", config).metrics
    result = {
        "config": name,
        "seed": seed,
        "overrides": CONFIGS[name],
        "gold_win_rate": evaluation["eval/gold/win_rate"],
        "gold_win_rate_ci95": [evaluation["eval/gold/win_rate_ci_low"], evaluation["eval/gold/win_rate_ci_high"]],
        "gold_win_tie_lose": [evaluation[f"eval/gold/{v}"] for v in ("win", "tie", "lose")],
        "rm_win_rate": evaluation["eval/rm/win_rate"],
        "final_kl": ppo["ppo/objective_kl"],
        "final_response_length": ppo["ppo/rollout_response_length"],
        "final_ppl_policy": ppo["ppo/monitor_ppl_policy"],
        "ppl_ref": ppo["ppo/monitor_ppl_ref"],
        "final_rollout_gold": ppo["ppo/monitor_gold_score"],
        "eval_gold_score_policy": ppo["ppo/eval_gold_score_policy"],
        "eval_gold_score_sft": ppo["ppo/eval_gold_score_sft"],
        "collapse_warnings": ppo["ppo/collapse_warnings"],
        "steps": ppo["ppo/steps"],
        "ppo_seconds": round(ppo_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "curves": read_curves(run_dir / "ppo" / "plots" / "train.csv"),
    }
    atomic_write_json(result_path, result)
    return result


def read_curves(path: Path) -> dict[str, list[float | None]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) if r.get(key) not in (None, "") else None for r in rows] for key in CURVES}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration: mean and standard deviation over seeds."""
    rows = []
    for name in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == name]
        row = {"config": name, "seeds": [r["seed"] for r in runs]}
        for key in (
            "gold_win_rate",
            "rm_win_rate",
            "final_kl",
            "final_response_length",
            "final_ppl_policy",
            "eval_gold_score_policy",
            "seconds",
        ):
            row[key], row[f"{key}_std"] = mean_and_spread([r[key] for r in runs])
        # The median, because a run that shared the CPU with another job takes several times longer.
        row["seconds_median"] = statistics.median(r["seconds"] for r in runs)
        row["gold_win_rate_per_seed"] = [r["gold_win_rate"] for r in runs]
        # Over-optimisation along the way (the paper's fig. 4 / Gao et al.): where the reward-model score and the
        # gold score of the rollouts end, and the best the gold score reached, as 10-iteration means.
        for key, curve in (("rollout_rm_score", "objective/scores"), ("rollout_gold_score", "monitor/gold_score")):
            row[f"{key}_last{SMOOTHING}"] = statistics.fmean(
                statistics.fmean(_finite(r["curves"][curve])[-SMOOTHING:]) for r in runs
            )
        row[f"rollout_gold_score_best{SMOOTHING}"] = statistics.fmean(
            max(smooth(_finite(r["curves"]["monitor/gold_score"]))[SMOOTHING - 1 :]) for r in runs
        )
        row["over_optimisation_gap"] = row["rm_win_rate"] - row["gold_win_rate"]
        row["collapse_warnings"] = sum(r["collapse_warnings"] for r in runs)
        rows.append(row)
    return rows


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def smooth(values: list[float]) -> list[float]:
    """Trailing moving average over SMOOTHING iterations (fewer at the start): one rollout of 64 samples is noisy."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i + 1 - SMOOTHING) : i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(window) if window else float("nan"))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf_core.plots import save_figure

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    names = list(dict.fromkeys(r["config"] for r in results))
    colours = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes, CURVES.items(), strict=True):
        for i, name in enumerate(names):
            runs = [r["curves"][key] for r in results if r["config"] == name and r["curves"].get(key)]
            if not runs:
                continue  # a run cached before this curve was read
            length = min(len(c) for c in runs)
            steps = list(range(1, length + 1))
            per_step = [[c[s] for c in runs if c[s] is not None and math.isfinite(c[s])] for s in range(length)]
            mean = smooth([statistics.fmean(v) if v else float("nan") for v in per_step])
            low = smooth([min(v) if v else float("nan") for v in per_step])
            high = smooth([max(v) if v else float("nan") for v in per_step])
            # Ablations dashed, so that one identical to ppo_max (value clip off) does not hide it.
            style = "--" if name.startswith("ppo_max-") else "-"
            ax.plot(steps, mean, color=colours(i), label=name, linewidth=1.2, linestyle=style)
            ax.fill_between(steps, low, high, color=colours(i), alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        if key == "objective/kl":
            ax.set_yscale("symlog", linthresh=1.0)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"PPO presets and ablations: mean over seeds (band: min to max), moving average over {SMOOTHING} iterations",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def print_table(rows: list[dict], seeds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Stability: mean +- std over {seeds} seed(s), default domain")
    for column in (
        "config",
        "gold win rate",
        "per seed",
        "RM win rate",
        "final KL",
        "length",
        "ppl",
        "collapse warnings",
        "s / run (median)",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["config"],
            f"{r['gold_win_rate']:.1%} +- {r['gold_win_rate_std']:.1%}",
            " ".join(f"{w:.1%}" for w in r["gold_win_rate_per_seed"]),
            f"{r['rm_win_rate']:.1%} +- {r['rm_win_rate_std']:.1%}",
            f"{r['final_kl']:.2f} +- {r['final_kl_std']:.2f}",
            f"{r['final_response_length']:.1f}",
            f"{r['final_ppl_policy']:.2f}",
            str(r["collapse_warnings"]),
            f"{r['seconds_median']:.0f}",
        )
    Console().print(table)


def markdown_table(rows: list[dict], seeds: list[int]) -> str:
    """The table of docs/results/benchmarks.md."""
    lines = [
        f"| configuration | gold win rate (mean +- sd) | per seed ({', '.join(map(str, seeds))}) | RM win rate | "
        "RM - gold | final KL | length | policy ppl | eval gold score | collapse warnings | s / run (median) |",
        "| --- " * 11 + "|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{w:.1%}" for w in r["gold_win_rate_per_seed"])
        lines.append(
            f"| `{r['config']}` | {r['gold_win_rate']:.1%} +- {r['gold_win_rate_std']:.1%} | {per_seed} | "
            f"{r['rm_win_rate']:.1%} | {r['over_optimisation_gap'] * 100:+.1f} pts | "
            f"{r['final_kl']:.2f} +- {r['final_kl_std']:.2f} | {r['final_response_length']:.1f} | "
            f"{r['final_ppl_policy']:.2f} | {r['eval_gold_score_policy']:.2f} | {r['collapse_warnings']} | "
            f"{r['seconds_median']:.0f} |"
        )
    lines += [
        "",
        f"| configuration | rollout RM score, last {SMOOTHING} | rollout gold score, last {SMOOTHING} | "
        f"best {SMOOTHING}-iteration gold score |",
        "| --- " * 4 + "|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['config']}` | {r[f'rollout_rm_score_last{SMOOTHING}']:.2f} | "
            f"{r[f'rollout_gold_score_last{SMOOTHING}']:.2f} | {r[f'rollout_gold_score_best{SMOOTHING}']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--base", type=Path, default=REPO / "outputs" / "bench" / "stability" / "base")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "stability" / "runs")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "stability.json")
    parser.add_argument("--steps", type=int, help="PPO iterations (default: params.yaml's); the long run: 1000")
    args = parser.parse_args()
    extra = [f"ppo.steps={args.steps}"] if args.steps else []

    import torch
    import transformers

    from rlhf_core.env import apply_defaults
    from rlhf_core.io import atomic_write_json

    apply_defaults()
    base, out = args.base.resolve(), args.out.resolve()
    build_base(base)
    results = []
    # Seed-major order: an interrupted benchmark has covered every configuration evenly.
    plan = [(name, seed) for seed in args.seeds for name in args.configs]
    for i, (name, seed) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {name} seed {seed}", flush=True)
        result = run_one(name, seed, base, out, extra)
        results.append(result)
        print(
            f"    gold win rate {result['gold_win_rate']:.1%}, RM {result['rm_win_rate']:.1%}, "
            f"KL {result['final_kl']:.2f}, {result['seconds']:.0f} s",
            flush=True,
        )
    rows = summarise(results)
    atomic_write_json(
        args.results,
        {
            "command": "python bench/stability.py " + " ".join(sys.argv[1:]),
            "base": str(args.base),
            "seeds": args.seeds,
            "summary": rows,
            "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
            "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        },
    )
    curves_png = args.results.with_name(f"{args.results.stem}_curves.png")
    plot(results, curves_png)
    print_table(rows, len(args.seeds))
    print(markdown_table(rows, args.seeds))
    print(f"results: {args.results}\nplot: {args.results.with_name(f'{args.results.stem}_curves.png')}")


if __name__ == "__main__":
    main()

"""The headline as a distribution: the whole pipeline over several data draws, for each PPO preset.

    .venv/bin/python bench/robustness.py                        # 5 draws x (vanilla, moss_released, ppo_max)
    # the critic-free presets on the same draws (grpo and rloo with 4 answers per prompt):
    .venv/bin/python bench/robustness.py --presets grpo rloo reinforce_pp --reuse-base
    # a recipe variant from each draw's own data and SFT policy, next to the baseline runs of the same draws:
    .venv/bin/python bench/robustness.py --presets ppo_max --variant mismatch --variant-from rm \
        --set rm.mismatch_fraction=0.5 --reuse-base --results bench/results/robustness_mismatch.json
    # PPO scored by an ensemble of three reward models per draw, the draw's and two more (rm.seed + 100, + 200):
    .venv/bin/python bench/robustness.py --presets ppo_max --variant ensemble3 --extra-rm-seeds 1 2 --reuse-base \
        --results bench/results/robustness_ensemble3.json
    .venv/bin/python bench/robustness.py --summarise bench/results/robustness.json

A draw is one pipeline seed: every stage's seed derives from it (``draw_overrides``), so a draw changes the
simulated data, the tiny model's initialisation, SFT's and the RM's data order, PPO's rollouts and the evaluation's
samples together, as a new user's run on other data would. Per draw the data, SFT policy, reward model and its
evaluation are built once (``<out>/draw<N>/``) and every preset's PPO and win-rate evaluation start from them.

A ``--variant NAME`` changes the stages from ``--variant-from`` (``rm`` or ``ppo``) on with ``--set``; they write
to their own ``*_NAME`` directories, the draw's earlier stages are shared with the baseline, and the baseline's
finished runs of the same draws are read back into the table for comparison. ``--reuse-base`` takes the shared
stages as built when their files are intact, even if the code has changed since (they are the inputs held fixed).

Resumable at every level: a stage whose inputs and params are unchanged is skipped by the stage scaffold, PPO
resumes from its last checkpoint, and a finished (draw, preset) keeps its ``result.json``; one recorded in the
``--results`` file with the same overrides and the same recipe file contents is taken from there when its
directory is gone (a study spread over sessions on machines that do not keep ``outputs/``), so a rerun only adds
the missing runs; ``--draws`` may name a few draws at a time, and the file keeps the other draws' runs. Results
are written after every run to ``--results`` (default ``bench/results/robustness.json``)
with the machine's CPU, with the plot beside it (``.png``: each draw's gold win rate and its 95% interval per
preset), and a table is printed with each preset's PPO seconds per iteration. Only what a user has steers a run:
the gold judge is read for the report, never for training or stopping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_core.stages import STAGES  # noqa: E402

PRESETS = ("vanilla", "moss_released", "ppo_max", "grpo", "rloo", "reinforce_pp")
DEFAULT_PRESETS = ("vanilla", "moss_released", "ppo_max")
# The group estimators compare a prompt's answers: 4 per prompt, so a rollout of the same size (the same sampling
# and scoring cost) covers a quarter of the prompts. REINFORCE++ keeps one answer per prompt, as its paper does.
PRESET_SETTINGS = {"grpo": ["ppo.samples_per_prompt=4"], "rloo": ["ppo.samples_per_prompt=4"]}
DEFAULT_DRAWS = (1, 2, 3, 4, 5)
BASE_STAGES = ("prepare", "sft", "rm", "rm-eval")  # shared by every preset of a draw; ppo and eval per preset


def draw_overrides(draw: int) -> list[str]:
    """Every stage's seed from the one pipeline seed ``draw`` (offsets keep the streams apart)."""
    return [
        f"data.seed={1000 + draw}",
        f"model.init_seed={draw}",
        f"sft.seed={2000 + draw}",
        f"rm.seed={3000 + draw}",
        f"ppo.seed={4000 + draw}",
        f"eval.seed={5000 + draw}",
    ]


ORDER = tuple(STAGES)


def variant_stages(variant: str | None, variant_from: str) -> tuple[str, ...]:
    """The stages a variant changes: ``variant_from`` and every later one (none without a variant)."""
    return ORDER[ORDER.index(variant_from) :] if variant else ()


def stage_dir(root: Path, stage: str, preset: str, variant: str | None, variant_from: str) -> Path:
    name = STAGES[stage].path_key + ("" if stage in BASE_STAGES else f"_{preset}")
    return root / (f"{name}_{variant}" if stage in variant_stages(variant, variant_from) else name)


def draw_config(draw: int, out: Path, preset: str, extra: list[str], tiny: bool, variant=None, variant_from="ppo",
                params: Path | None = None):  # fmt: skip
    from rlhf_core.config import load_config

    root = out / f"draw{draw}"
    size = []
    if tiny:
        from tests.conftest import TINY

        size = list(TINY)
    paths = [f"paths.{STAGES[s].path_key}={stage_dir(root, s, preset, variant, variant_from)}" for s in ORDER]
    preset_settings = PRESET_SETTINGS.get(preset, [])
    overrides = [*size, *draw_overrides(draw), f"ppo.preset={preset}", *preset_settings, *extra, *paths,
                 "tracking.enabled=false"]  # fmt: skip
    return load_config(params or REPO / "params.yaml", overrides)


def recipe_fingerprint(params: Path | None) -> str:
    """The recipe file's content hash (``params.yaml`` without ``--params``): a run recorded under another recipe
    is another run, even with the same overrides and the same file name."""
    return hashlib.sha256((params or REPO / "params.yaml").read_bytes()).hexdigest()[:16]


def result_path(out: Path, draw: int, preset: str, variant: str | None = None) -> Path:
    return out / f"draw{draw}" / (f"result_{preset}_{variant}.json" if variant else f"result_{preset}.json")


def ensemble_dirs(out: Path, draw: int, extra_rm_seeds: list[int]) -> list[Path]:
    return [out / f"draw{draw}" / f"rm_seed{n}" for n in extra_rm_seeds]


def run_draw(draw: int, preset: str, out: Path, extra: list[str], tiny: bool, variant=None, variant_from="ppo",
             reuse_base=False, extra_rm_seeds=(), params: Path | None = None, recorded=()) -> dict:  # fmt: skip
    """One (draw, preset): the draw's shared stages (skipped when unchanged), the extra reward models of an
    ensemble if any, then PPO and the evaluation. A run already in ``recorded`` (the results file's runs) with the
    same overrides is taken from there when its result file is missing."""
    from rlhf_core import distributed
    from rlhf_core.io import atomic_write_json
    from rlhf_core.pipeline import run_stage

    path = result_path(out, draw, preset, variant)
    if path.is_file():
        return json.loads(path.read_text())
    members = ensemble_dirs(out, draw, list(extra_rm_seeds))
    if members:
        extra = [*extra, f"ppo.reward_ensemble=[{', '.join(str(m) for m in members)}]"]
    label = f"{preset}+{variant}" if variant else preset
    recipe = recipe_fingerprint(params)
    kept = recorded_run(recorded, draw, label, extra, recipe)
    if kept is not None:  # finished in an earlier session whose run directory is gone: keep it, don't retrain
        print(f"[draw {draw} {label}] finished earlier: taken from the results file", flush=True)
        atomic_write_json(path, kept)
        return kept
    config = draw_config(draw, out, preset, extra, tiny, variant, variant_from, params)
    started = time.time()
    metrics: dict = {}
    for stage in ORDER:
        if stage == "ppo":
            train_ensemble_members(config, members, list(extra_rm_seeds))
        print(f"[draw {draw} {preset}{'+' + variant if variant else ''}] {stage}", flush=True)
        kept = (
            _built_stage_metrics(config, stage)
            if reuse_base and stage not in variant_stages(variant, variant_from)
            else None
        )
        if kept is not None:
            metrics.update(kept)
            continue
        try:
            metrics.update(run_stage(stage, config, skip_unchanged=True).metrics)
        finally:
            distributed.shutdown()
    result = summarise_run(draw, label, extra, metrics)
    result["recipe_sha256"] = recipe
    result["seconds"] = round(time.time() - started, 1)
    # A study over sessions may run its draws on other CPUs: each run names the one that finished it, and the
    # seconds of every stage it ran (shared stages built in an earlier run are not re-timed).
    from bench.real_model_options import cpu_description

    result["cpu"] = cpu_description()
    result["bf16"] = distributed.bf16_enabled(config.distributed)  # distributed.bf16=auto decides by the CPU
    result["stage_seconds"] = {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("/seconds")}
    result["ppo_seconds_per_iteration"] = ppo_phase_seconds(Path(config.paths.ppo))
    atomic_write_json(path, result)
    return result


def ppo_phase_seconds(ppo_dir: Path) -> dict | None:
    """Median wall seconds per PPO iteration by phase (generation, scoring, training) and their total, from the
    stage's whole training curve (``plots/train.csv``, which a resumed run carries over from its checkpoint): what
    a preset costs beside what it wins. The median, not the mean, so that a few iterations slowed by something
    else on the machine (a paused run, a test beside it) do not move it. None when the curve is missing."""
    from bench.real_model_options import read_train_csv

    if not (ppo_dir / "plots" / "train.csv").is_file():
        return None
    rows = read_train_csv(ppo_dir)
    phases = ("generation", "scoring", "training")
    if not rows or any(f"time/{p}" not in rows[0] for p in phases):
        return None
    medians = {p: statistics.median(float(r[f"time/{p}"]) for r in rows) for p in phases}
    return {k: round(v, 2) for k, v in {**medians, "total": sum(medians.values())}.items()}


def train_ensemble_members(config, members: list[Path], extra_rm_seeds: list[int]) -> None:
    """The ensemble's other reward models: the draw's RM recipe with rm.seed moved by 100 x N, from the draw's
    data and SFT policy (skipped when already trained)."""
    from rlhf_core import distributed
    from rlhf_core.pipeline import run_stage

    for directory, n in zip(members, extra_rm_seeds, strict=True):
        paths = config.paths.model_copy(update={"rm": str(directory)})
        member = config.model_copy(
            update={"paths": paths, "rm": config.rm.model_copy(update={"seed": config.rm.seed + 100 * n})}
        )
        print(f"  ensemble member {directory.name} (rm.seed={member.rm.seed})", flush=True)
        try:
            run_stage("rm", member, skip_unchanged=True)
        finally:
            distributed.shutdown()


def _built_stage_metrics(config, stage: str) -> dict | None:
    """A shared stage's metrics when its outputs are on disk as its manifest records them, whatever code built it."""
    from rlhf_core import commit
    from rlhf_core.stages import output_dir

    out = Path(output_dir(config, stage))
    stamp = commit.read_manifest(out)
    if stamp is None or not commit.unchanged(out, stamp):
        return None
    metrics = out / "metrics.json"  # prepare writes none
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def summarise_run(draw: int, preset: str, extra: list[str], m: dict) -> dict:
    """The numbers the report needs from one run's stage metrics."""
    gold = "eval/gold/win_rate" in m
    return {
        "draw": draw,
        "preset": preset,
        "overrides": extra,
        "rm_gold_accuracy": m.get("rm_eval/gold_accuracy"),
        "rm_accuracy": m.get("rm_eval/accuracy"),
        "gold_win_rate": m["eval/gold/win_rate"] if gold else None,
        "gold_win_rate_ci95": [m["eval/gold/win_rate_ci_low"], m["eval/gold/win_rate_ci_high"]] if gold else None,
        "gold_lc_win_rate": m.get("eval/gold/lc_win_rate"),
        "gold_lc_win_rate_ci95": [m["eval/gold/lc_win_rate_ci_low"], m["eval/gold/lc_win_rate_ci_high"]]
        if "eval/gold/lc_win_rate" in m
        else None,
        "rm_win_rate": m["eval/rm/win_rate"],
        "rm_lc_win_rate": m.get("eval/rm/lc_win_rate"),
        "response_tokens": [m.get("eval/response_tokens_sft"), m.get("eval/response_tokens_ppo")],
        "refusal_share_harmful": [m.get("eval/harmful/refusal_share_sft"), m.get("eval/harmful/refusal_share_ppo")],
        "overoptimisation_gap": m.get("eval/overoptimisation_gap"),
        "cleanup_ceiling": m.get("eval/gold/cleanup_ceiling"),
        "final_kl": m["ppo/objective_kl"],
        "final_rm_score": m["ppo/objective_scores"],
        "final_response_length": m["ppo/rollout_response_length"],
        "collapse_warnings": m["ppo/collapse_warnings"],
    }


# ------------------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict]) -> list[dict]:
    """One row per preset: mean and standard deviation over draws, and how many draws meet the targets."""
    rows = []
    by_draw = {(r["draw"], r["preset"]): r for r in results}
    for preset in dict.fromkeys(r["preset"] for r in results):
        runs = [r for r in results if r["preset"] == preset]
        row: dict = {"preset": preset, "draws": [r["draw"] for r in runs]}
        for key in ("gold_win_rate", "gold_lc_win_rate", "rm_win_rate", "rm_lc_win_rate", "overoptimisation_gap",
                    "final_kl", "rm_gold_accuracy"):  # fmt: skip
            row[key], row[f"{key}_sd"] = spread([r.get(key) for r in runs])  # older results lack the newer keys
        row["collapse_warnings"] = sum(r["collapse_warnings"] for r in runs)
        row["ppo_seconds_per_iteration"], _ = spread([(r.get("ppo_seconds_per_iteration") or {}).get("total")
                                                      for r in runs])  # fmt: skip
        row["draws_ci_above_50"] = sum(1 for r in runs if r["gold_win_rate_ci95"] and r["gold_win_rate_ci95"][0] > 0.5)
        row["draws_lc_ci_above_50"] = sum(1 for r in runs if (r.get("gold_lc_win_rate_ci95") or [0])[0] > 0.5)
        vanilla = [(r, by_draw.get((r["draw"], "vanilla"))) for r in runs]
        row["draws_gap_below_vanilla"] = sum(
            1 for r, v in vanilla if v and r["overoptimisation_gap"] < v["overoptimisation_gap"]
        )
        row["draws_with_vanilla"] = sum(1 for _, v in vanilla if v)
        rows.append(row)
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in results))
    draws = sorted({r["draw"] for r in results})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(presets), 1)
    for i, preset in enumerate(presets):
        runs = sorted((r for r in results if r["preset"] == preset and r["gold_win_rate"] is not None),
                      key=lambda r: r["draw"])  # fmt: skip
        xs = [draws.index(r["draw"]) + (i - (len(presets) - 1) / 2) * width for r in runs]
        ys = [r["gold_win_rate"] for r in runs]
        low = [r["gold_win_rate"] - r["gold_win_rate_ci95"][0] for r in runs]
        high = [r["gold_win_rate_ci95"][1] - r["gold_win_rate"] for r in runs]
        line = ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=preset)
        # The length-controlled rate beside it, hollow: where the two part, length bought part of the win.
        controlled = [(x, r["gold_lc_win_rate"]) for x, r in zip(xs, runs, strict=True) if r.get("gold_lc_win_rate")]
        if controlled:
            ax.plot([x + width / 4 for x, _ in controlled], [y for _, y in controlled], "o", mfc="none",
                    color=line[0].get_color(), label=f"{preset}, length-controlled")  # fmt: skip
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(draws)), [f"draw {d}" for d in draws])
    ax.set_xlim(-0.6, len(draws) - 0.4)  # one draw alone would otherwise spread its presets to the edges
    ax.set_ylabel("gold win rate vs SFT (95% CI)")
    ax.set_title("PPO presets over data draws (each draw: its own data, SFT, RM, seeds)")
    # Beside the axes, not on them: with five presets no corner of the plot is free of intervals.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def print_table(results: list[dict], rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Gold win rate over draws")
    for column in ("draw", *dict.fromkeys(r["preset"] for r in results)):
        table.add_column(column)
    for draw in sorted({r["draw"] for r in results}):
        cells = []
        for row in rows:
            r = next((x for x in results if x["draw"] == draw and x["preset"] == row["preset"]), None)
            cells.append("" if r is None else _cell(r))
        table.add_row(str(draw), *cells)
    means = [f"{r['gold_win_rate']:.1%} ± {r['gold_win_rate_sd']:.1%}; gap {r['overoptimisation_gap']:+.1%}; "
             f"KL {r['final_kl']:.2f}" for r in rows]  # fmt: skip
    table.add_row("mean ± sd", *means)
    table.add_row("CI above 50%", *(f"{r['draws_ci_above_50']} of {len(r['draws'])}" for r in rows))
    table.add_row("PPO s/iteration", *(f"{r['ppo_seconds_per_iteration']:.2f}" for r in rows))
    Console().print(table)


def _cell(r: dict) -> str:
    low, high = r["gold_win_rate_ci95"]
    controlled = f", length-controlled {r['gold_lc_win_rate']:.1%}" if r.get("gold_lc_win_rate") is not None else ""
    return (f"{r['gold_win_rate']:.1%} [{low:.1%}, {high:.1%}]{controlled}; RM {r['rm_win_rate']:.1%}, gap "
            f"{r['overoptimisation_gap']:+.1%}, KL {r['final_kl']:.2f}, warnings {r['collapse_warnings']}")  # fmt: skip


def write(results: list[dict], args, path: Path) -> None:
    from bench.real_model_options import cpu_description
    from rlhf_core.io import atomic_write_json

    rows = summarise(results)
    payload = {"command": " ".join(sys.argv), "cpu": cpu_description(), "overrides": args.set or [],
               "tiny": args.tiny, "summary": rows, "runs": results}  # fmt: skip
    atomic_write_json(path, payload)
    plot(results, path.with_suffix(".png"))


def recorded_runs(path: Path, tiny: bool) -> list[dict]:
    """The runs an earlier invocation wrote to the results file ``path`` at the same sizes (none if it is absent).
    A study spread over sessions keeps this file in git while the run directories may not survive."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    return saved["runs"] if saved.get("tiny", False) == tiny else []


def recorded_run(recorded, draw: int, label: str, extra: list[str], recipe: str) -> dict | None:
    """The recorded run of (draw, label) with the same overrides and recipe. Runs recorded before the recipe's
    hash was kept match on their overrides alone."""

    def key(r: dict) -> tuple:
        return r["draw"], r["preset"], r["overrides"], r.get("recipe_sha256", recipe)

    return next((r for r in recorded if key(r) == (draw, label, extra, recipe)), None)


def other_draws(path: Path, args, recipe: str) -> list[dict]:
    """The results file's runs of draws this invocation does not run, made with the same sizes, overrides and recipe:
    a study run a draw at a time (``--draws 4``, then ``--draws 5``) adds to its file instead of replacing it."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("tiny", False) != args.tiny or saved.get("overrides", []) != (args.set or []):
        return []
    return [r for r in saved["runs"] if r["draw"] not in args.draws and r.get("recipe_sha256", recipe) == recipe]


def baseline_runs(out: Path, draw: int) -> list[dict]:
    """The finished baseline runs of ``draw`` (every preset without a variant), for the variant's comparison."""
    return [json.loads(p.read_text()) for preset in PRESETS if (p := result_path(out, draw, preset)).is_file()]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, nargs="+", default=list(DEFAULT_DRAWS))
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=PRESETS)
    parser.add_argument("--params", type=Path, help="a recipe (partial params file) instead of params.yaml, e.g. "
                        "bench/recipes/smollm2_sim.yaml; its paths are replaced by --out's")  # fmt: skip
    parser.add_argument("--set", action="append", help="an override for every run, e.g. ppo.kl_coef=0.1")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "robustness")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "robustness.json")
    parser.add_argument("--variant", help="name of a recipe variant: the --set overrides, in their own directories")
    parser.add_argument("--variant-from", choices=["rm", "ppo"], default="ppo", help="the first stage it changes")
    parser.add_argument("--reuse-base", action="store_true", help="take intact shared stages as built")
    parser.add_argument("--extra-rm-seeds", type=int, nargs="*", default=[],
                        help="an RM ensemble: more RMs (rm.seed + 100 x N) score PPO with the draw's")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny sizes (a smoke run)")
    parser.add_argument("--summarise", type=Path, help="reprint a results file and exit")
    args = parser.parse_args(argv)
    if args.summarise:
        results = json.loads(args.summarise.read_text())["runs"]
        print_table(results, summarise(results))
        return results

    from rlhf_core.env import apply_defaults

    apply_defaults()
    results, recorded = [], recorded_runs(args.results, args.tiny)
    kept = other_draws(args.results, args, recipe_fingerprint(args.params))
    for draw in args.draws:  # draw by draw: a draw's shared stages are built once, then every preset uses them
        if args.variant:
            results += baseline_runs(args.out, draw)
        for preset in args.presets:
            results.append(run_draw(draw, preset, args.out, args.set or [], args.tiny, args.variant,
                                    args.variant_from, args.reuse_base, args.extra_rm_seeds, args.params,
                                    recorded))  # fmt: skip
            write(sorted([*kept, *results], key=lambda r: r["draw"]), args, args.results)
    print_table(results, summarise(results))
    return results


if __name__ == "__main__":
    main()

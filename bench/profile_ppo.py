"""Where our PPO iteration's time goes: cProfile of the trainer on bench/ppo_speed.py's workload.

    .venv/bin/python bench/profile_ppo.py                 # 10 iterations, ~40 s
    .venv/bin/python bench/profile_ppo.py --iterations 20 --top 30

Runs the ``ppo`` stage with ppo_speed's settings (its final evaluation included) under cProfile and prints the
functions with the most time of their own (seconds, share of the whole run, milliseconds per call) and the
trainer's own per-phase seconds per iteration. Start-up (imports, model loading) is in the total. Writes
``bench/results/profile_ppo.json``. Needs the default pipeline's outputs (``make run``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--top", type=int, default=15, help="functions to list")
    parser.add_argument("--base", type=Path, default=REPO / "outputs", help="pipeline outputs (data, sft, rm)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "profile_ppo.json")
    args = parser.parse_args()

    import ppo_speed

    missing = [str(p) for p in ppo_speed.required_inputs(args.base) if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `make run` first")

    from rich.console import Console
    from rich.table import Table

    from rlhf_core.config import load_config
    from rlhf_core.env import apply_defaults
    from rlhf_core.io import atomic_write_json
    from rlhf_core.pipeline import run_stage

    apply_defaults()
    with tempfile.TemporaryDirectory() as work:
        overrides = ppo_speed.ours_overrides(args.base, Path(work) / "ppo", args.iterations, [])
        config = load_config(REPO / "params.yaml", overrides)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        result = run_stage("ppo", config)
        profiler.disable()
        seconds = time.perf_counter() - started
    phases = {
        phase: sum(r[f"time/{phase}"] for r in result.history) / len(result.history)
        for phase in ("generation", "scoring", "training")
    }
    # (file, line, name) -> (primitive calls, calls, own time, cumulative time, callers)
    stats = pstats.Stats(profiler).stats
    rows = sorted(
        ({"function": _name(key), "calls": value[1], "own_seconds": value[2]} for key, value in stats.items()),
        key=lambda row: -row["own_seconds"],
    )[: args.top]
    atomic_write_json(
        args.results,
        {
            "command": "python bench/profile_ppo.py " + " ".join(sys.argv[1:]),
            "iterations": args.iterations,
            "seconds_total": seconds,
            "seconds_per_iteration_by_phase": phases,
            "top_functions_by_own_time": rows,
        },
    )
    table = Table(title=f"cProfile: {args.iterations} PPO iterations + final evaluation, {seconds:.1f} s in all")
    for column in ("function (own time)", "calls", "s", "share of the run", "ms / call"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["function"],
            str(row["calls"]),
            f"{row['own_seconds']:.2f}",
            f"{row['own_seconds'] / seconds:.1%}",
            f"{1e3 * row['own_seconds'] / max(row['calls'], 1):.2f}",
        )
    Console(width=160).print(table)
    print("per iteration: " + ", ".join(f"{phase} {s:.2f} s" for phase, s in phases.items()))
    print(f"results: {args.results}")


def _name(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    if filename == "~":  # a built-in
        return function
    parts = Path(filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1 :] if "site-packages" in parts else parts[-2:])
    return f"{short}:{line}({function})"


if __name__ == "__main__":
    main()

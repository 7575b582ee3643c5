"""bench/measured.py: the docs' table of the default run comes from the run's outputs, and the page's copy is
exactly what the committed results render (a hand edit fails here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def finished_tiny_run(trained_tiny_rm, prepared_tiny, tmp_path_factory):
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    out, _ = trained_tiny_rm
    root = tmp_path_factory.mktemp("measured")
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.rm_eval={root / 'rm_eval'}",
             f"paths.ppo={root / 'ppo'}", f"paths.eval={root / 'eval'}"]  # fmt: skip
    overrides = [*tiny_overrides(prepared_tiny[0]), *paths]
    config = load_config(None, overrides)
    for stage in ("rm-eval", "ppo", "eval"):
        run_stage(stage, config)
    (out / "sft" / "metrics.json").write_text(json.dumps({  # the tiny stack's SFT policy is untrained: its numbers
        "sft/val_loss": 6.5, "sft/ppl": 665.1, "sft/steps": 8, "sft/global_batch": 8, "sft/seconds": 1.5,
        "sft/sample_gold_score": -1.0, "sft/sample_flawless_rate": 0.0}))  # fmt: skip
    return config, overrides


def test_the_table_is_read_from_the_run_and_written_between_the_markers(finished_tiny_run, tmp_path):
    from bench import measured

    config, overrides = finished_tiny_run
    rows = measured.collect(config)
    assert len(rows) >= 15 and all(what and value for what, value in rows)
    gold = json.loads((Path(config.paths.rm_eval) / "metrics.json").read_text())["rm_eval/gold_accuracy"]
    assert any(f"{100 * gold:.1f}%" in value for _, value in rows)  # the stage's own number, not recomputed

    readme, results = tmp_path / "README.md", tmp_path / "measured.json"
    readme.write_text(f"# Project\n\nbefore\n\n{measured.START}\nold table\n{measured.END}\n\nafter\n")
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    args = ["--params", str(params), "--results", str(results), "--readme", str(readme)]
    assert measured.main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    text = readme.read_text()
    assert text.startswith("# Project\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    record = json.loads(results.read_text())
    assert record["machine"]["cores"] and record["date"] and record["rows"] == rows
    assert measured.main([*args, "--check"]) == 0
    readme.write_text(text.replace(rows[0][1], "typed by hand"))
    assert measured.main([*args, "--check"]) == 1


def test_the_docs_table_is_what_the_committed_results_render():
    from bench import measured

    assert measured.main(["--check"]) == 0, "the measured block was edited by hand; rerun bench/measured.py"
    record = json.loads((REPO / "bench" / "results" / "measured.json").read_text())
    assert record["machine"]["model"] and record["commit"] != "?"

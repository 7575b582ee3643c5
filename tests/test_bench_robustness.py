"""bench/robustness.py at tiny sizes: two draws that differ in everything a pipeline seed reaches, two presets from
each draw's shared stages, and a rerun that reads every finished run back instead of training again."""

from __future__ import annotations

import json

import pytest
import yaml


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """Two tiny draws, vanilla and ppo_max each: (runs directory, results file, the study's arguments, results).
    The variant test adds its runs beside these, as a user adds a variant to a finished study."""
    from bench import robustness

    root = tmp_path_factory.mktemp("robustness")
    out, results_file = root / "runs", root / "robustness.json"
    args = ["--tiny", "--draws", "1", "2", "--presets", "vanilla", "ppo_max", "--out", str(out),
            "--results", str(results_file)]  # fmt: skip
    return out, results_file, args, robustness.main(args)


@pytest.mark.slow
def test_robustness_runs_draws_resumes_and_summarises(base_runs, monkeypatch):
    from bench import robustness

    out, results_file, args, first = base_runs

    assert [(r["draw"], r["preset"]) for r in first] == [(1, "vanilla"), (1, "ppo_max"), (2, "vanilla"), (2, "ppo_max")]
    splits = [(out / f"draw{d}" / "data" / "splits" / "ppo.jsonl").read_text() for d in (1, 2)]
    assert splits[0] != splits[1]  # a draw is other data, not only another PPO seed
    for run in first:
        low, high = run["gold_win_rate_ci95"]
        assert low <= run["gold_win_rate"] <= high and run["rm_gold_accuracy"] is not None
        low, high = run["gold_lc_win_rate_ci95"]
        assert low <= run["gold_lc_win_rate"] <= high and run["rm_lc_win_rate"] is not None
        assert run["cpu"]["cores"] and run["stage_seconds"]["ppo"] > 0 and all(run["response_tokens"])
        assert run["bf16"] is False  # the tiny sizes run in float32
        phases = run["ppo_seconds_per_iteration"]
        assert phases["total"] == pytest.approx(phases["generation"] + phases["scoring"] + phases["training"], abs=0.02)
        assert run["recipe_sha256"] == robustness.recipe_fingerprint(None)

    saved = json.loads(results_file.read_text())
    assert saved["cpu"]["cores"] and results_file.with_suffix(".png").stat().st_size > 0
    ppo_max = next(row for row in saved["summary"] if row["preset"] == "ppo_max")
    assert ppo_max["draws"] == [1, 2] and ppo_max["draws_with_vanilla"] == 2
    runs, vanilla = (
        [r for r in first if r["preset"] == "ppo_max"],
        {r["draw"]: r for r in first if r["preset"] == "vanilla"},
    )
    assert ppo_max["draws_ci_above_50"] == sum(r["gold_win_rate_ci95"][0] > 0.5 for r in runs)
    assert ppo_max["draws_gap_below_vanilla"] == sum(
        r["overoptimisation_gap"] < vanilla[r["draw"]]["overoptimisation_gap"] for r in runs
    )

    import rlhf_core.pipeline

    monkeypatch.setattr(rlhf_core.pipeline, "run_stage", lambda *a, **k: pytest.fail("a finished run was rerun"))
    assert robustness.main(args) == first

    # A later session on a machine without outputs/: the committed results file alone is enough not to retrain.
    for run in first:
        robustness.result_path(out, run["draw"], run["preset"]).unlink()
    assert robustness.main(args) == first
    assert json.loads(robustness.result_path(out, 2, "ppo_max").read_text()) == first[3]
    # ...but only for the same settings: other overrides are another run.
    other = robustness.recorded_runs(results_file, tiny=True)
    assert robustness.recorded_run(other, 2, "ppo_max", ["ppo.kl_coef=0.3"], first[3]["recipe_sha256"]) is None
    assert robustness.recorded_run(other, 2, "ppo_max", [], "another recipe") is None  # the same file name, edited
    legacy = [{k: v for k, v in run.items() if k != "recipe_sha256"} for run in other]  # recorded before the hash
    assert robustness.recorded_run(legacy, 2, "ppo_max", [], "any") == legacy[3]
    assert robustness.recorded_runs(results_file, tiny=False) == []

    # A study run a draw at a time: the file keeps the draws this invocation does not name, in draw order.
    draw2 = [*args[:2], "2", *args[4:]]
    assert draw2[1:3] == ["--draws", "2"] and robustness.main(draw2) == first[2:]
    assert json.loads(results_file.read_text())["runs"] == first
    from argparse import Namespace

    recipe = first[0]["recipe_sha256"]
    assert robustness.other_draws(results_file, Namespace(tiny=True, set=None, draws=[2]), recipe) == first[:2]
    other_settings = Namespace(tiny=True, set=["ppo.kl_coef=0.3"], draws=[2])  # another study: not kept
    assert robustness.other_draws(results_file, other_settings, recipe) == []
    assert robustness.other_draws(results_file, Namespace(tiny=True, set=None, draws=[2]), "another recipe") == []


@pytest.mark.slow
def test_a_variant_reruns_only_the_stages_it_changes_and_sits_beside_the_baseline(base_runs, tmp_path, monkeypatch):
    import rlhf_core.pipeline
    from bench import robustness

    out, variant_file = base_runs[0], tmp_path / "variant.json"
    common = ["--tiny", "--draws", "1", "--out", str(out)]
    stamps = {d: (out / "draw1" / d / "stage.json").read_text() for d in ("data", "sft", "rm", "rm_eval")}

    ran: list[str] = []
    real_run_stage = rlhf_core.pipeline.run_stage

    def spy(stage, config, **kwargs):
        ran.append(stage)
        return real_run_stage(stage, config, **kwargs)

    monkeypatch.setattr(rlhf_core.pipeline, "run_stage", spy)
    variant_args = ["--presets", "ppo_max", "--variant", "mm", "--variant-from", "rm",
                    "--set", "rm.mismatch_fraction=0.5", "--reuse-base", "--results", str(variant_file)]  # fmt: skip
    results = robustness.main([*common, *variant_args])

    assert ran == ["rm", "rm-eval", "ppo", "eval"]  # data and SFT are the baseline's, taken as built
    assert {r["preset"] for r in results} == {"vanilla", "ppo_max", "ppo_max+mm"}
    assert (out / "draw1" / "rm_mm" / "stage.json").is_file() and (out / "draw1" / "ppo_ppo_max_mm").is_dir()
    assert stamps == {d: (out / "draw1" / d / "stage.json").read_text() for d in stamps}  # the baseline untouched
    variant = next(r for r in results if r["preset"] == "ppo_max+mm")
    assert variant["overrides"] == ["rm.mismatch_fraction=0.5"]
    row = next(r for r in json.loads(variant_file.read_text())["summary"] if r["preset"] == "ppo_max+mm")
    assert row["draws_with_vanilla"] == 1  # the gap is compared with the baseline's vanilla run of the draw

    ran.clear()
    ensemble = robustness.main([*common, "--presets", "ppo_max", "--variant", "ens", "--extra-rm-seeds", "1",
                                "--reuse-base", "--results", str(tmp_path / "ens.json")])  # fmt: skip
    assert ran == ["rm", "ppo", "eval"]  # the second member, then PPO scored by both
    member = out / "draw1" / "rm_seed1"
    assert (member / "stage.json").is_file() and (member / "model" / "reward_stats.json").is_file()
    ppo_config = yaml.safe_load((out / "draw1" / "ppo_ppo_max_ens" / "config.yaml").read_text())
    assert ppo_config["ppo"]["reward_ensemble"] == [str(member)]
    assert ppo_config["rm"]["seed"] != yaml.safe_load((member / "config.yaml").read_text())["rm"]["seed"]
    assert "ppo_max+ens" in {r["preset"] for r in ensemble}


def test_a_recipe_sets_every_draw_but_its_seeds_and_paths(tmp_path):
    """--params: a draw of the SmolLM2 recipe takes the recipe's sizes, the draw's seeds and --out's paths."""
    from bench import robustness

    recipe = robustness.REPO / "bench" / "recipes" / "smollm2_sim.yaml"
    config = robustness.draw_config(2, tmp_path, "vanilla", ["ppo.kl_coef=0.2"], False, params=recipe)
    assert config.model.name_or_path == "smollm2-135m-instruct" and config.ppo.steps == 40  # the recipe's
    assert config.data.seed == 1002 and config.rm.seed == 3002 and config.ppo.preset == "vanilla"  # the draw's
    assert config.ppo.kl_coef == 0.2 and not config.tracking.enabled
    assert config.paths.ppo == str(tmp_path / "draw2" / "ppo_vanilla")
    assert config.paths.sft == str(tmp_path / "draw2" / "sft")


def test_ppo_seconds_per_iteration_are_the_curves_phase_medians(tmp_path):
    """Three iterations written by hand, the last slowed 100-fold (a paused run): the phase medians, untouched by
    it, and their total; no curve, no numbers."""
    from bench.robustness import ppo_phase_seconds

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "train.csv").write_text(
        "step,time/generation,time/scoring,time/training,objective/kl\n"
        "1,2.0,1.0,4.0,0.1\n2,3.0,2.0,6.0,0.2\n3,300.0,200.0,600.0,0.3\n"
    )
    assert ppo_phase_seconds(tmp_path) == {"generation": 3.0, "scoring": 2.0, "training": 6.0, "total": 11.0}
    assert ppo_phase_seconds(tmp_path / "missing") is None


def test_the_summary_counts_draws_by_hand():
    """Two draws: ppo_max's interval is above 50% on the first only, and its gap is below vanilla's on the second."""
    from bench.robustness import summarise

    def run(draw, preset, win, low, gap, lc_low=0.4):
        return {"draw": draw, "preset": preset, "gold_win_rate": win, "gold_win_rate_ci95": [low, win + 0.05],
                "gold_lc_win_rate": lc_low + 0.05, "gold_lc_win_rate_ci95": [lc_low, lc_low + 0.1],
                "rm_win_rate": 0.6, "overoptimisation_gap": gap, "final_kl": 1.0, "rm_gold_accuracy": 0.8,
                "collapse_warnings": 1, "ppo_seconds_per_iteration": {"total": 2.0 if draw == 1 else 3.0}}  # fmt: skip

    results = [run(1, "vanilla", 0.50, 0.45, 0.10), run(1, "ppo_max", 0.58, 0.52, 0.20, lc_low=0.47),
               run(2, "vanilla", 0.40, 0.35, 0.30), run(2, "ppo_max", 0.54, 0.49, 0.05, lc_low=0.51)]  # fmt: skip
    row = next(r for r in summarise(results) if r["preset"] == "ppo_max")
    assert (row["draws_ci_above_50"], row["draws_gap_below_vanilla"], row["draws_with_vanilla"]) == (1, 1, 2)
    assert row["draws_lc_ci_above_50"] == 1 and row["gold_lc_win_rate"] == pytest.approx(0.54)
    assert row["gold_win_rate"] == pytest.approx(0.56) and row["collapse_warnings"] == 2
    assert row["ppo_seconds_per_iteration"] == pytest.approx(2.5)

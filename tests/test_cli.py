"""The `rlhf` command: one-line actionable errors and exit codes, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _rlhf(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "rlhf_core.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_bad_config_is_one_line_naming_key_value_and_range(tmp_path):
    proc = _rlhf("prepare", "--set", "sft.lr=-1", "--set", f"paths.data={tmp_path / 'data'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sft.lr = -1" in lines[0] and "greater than 0" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists(), "nothing may be written before validation passes"


def test_bad_data_names_file_and_line(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hi again"}\n')
    proc = _rlhf(
        "prepare",
        "--set", "data.source=jsonl",
        "--set", f"data.sft_file={sft}",
        "--set", f"data.rm_file={tmp_path / 'rm.jsonl'}",
        "--set", f"data.ppo_file={tmp_path / 'ppo.jsonl'}",
        "--set", f"paths.data={tmp_path / 'data'}",
        "--set", "tracking.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{sft}:2: missing field 'response'" in proc.stderr
    assert "data.on_bad_rows=skip" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_the_stages_and_the_pipeline():
    """`rlhf` (flows.cli, the console script) has every stage and `run`; `python -m rlhf_core.cli`, what torchrun and
    DVC-style stage calls use, has the stages without importing flows."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rlhf": "flows.cli:main"}
    full = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    stages = _rlhf("--help")
    assert full.returncode == 0 and stages.returncode == 0
    commands = ("prepare", "sft", "rm", "rm-eval", "ppo", "eval")
    assert all(f"│ {c} " in full.stdout and f"│ {c} " in stages.stdout for c in commands)
    assert "│ run " in full.stdout and "│ run " not in stages.stdout


def test_config_prints_every_settable_key_with_a_value_set_takes_back_and_a_description():
    """`rlhf config` lists every leaf of the configuration; feeding each printed value back through --set gives the
    same configuration, so the listing is the reference for --set. Null tricks show the preset's value."""
    from rlhf_core.config import describe_config, load_config

    config = load_config(REPO / "params.yaml", ["ppo.kl_coef=0.2", "ppo.preset=vanilla"])
    rows = describe_config(config)
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)) and len(keys) > 100
    assert all(description for _, _, description in rows), [k for k, _, d in rows if not d]
    shown = dict((key, value) for key, value, _ in rows)
    assert shown["ppo.kl_coef"] == "0.2" and shown["ppo.tricks.kl_penalty"] == "null (vanilla: false)"
    back = [f"{key}={value.split(' (')[0]}" for key, value, _ in rows]
    assert load_config(None, back) == config

    proc = _rlhf("config", "ppo.tricks", "--set", "ppo.preset=vanilla")
    assert proc.returncode == 0, proc.stderr
    assert "ppo.tricks.kl_penalty" in proc.stdout and "sft.lr" not in proc.stdout
    proc = _rlhf("config", "ppo.reward_ensemble", "--set", "ppo.reward_ensemble=[outputs/rm_a, outputs/rm_b]")
    assert "[outputs/rm_a, outputs/rm_b]" in proc.stdout  # a list is shown as --set takes it, not eaten as markup
    proc = _rlhf("config", "nothing.like.this")
    assert proc.returncode == 2 and "`rlhf config` lists them all" in proc.stderr


def test_summary_lists_each_stage_outputs_once_on_one_line(tmp_path, capsys, monkeypatch):
    """The summary's results are not buried under one row per artifact: one compact row per stage."""
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal, so that each row is one line
    from rlhf_core.cli import print_summary
    from rlhf_core.config import load_config
    from rlhf_core.stages import STAGES, output_dir

    config = load_config(None, [f"paths.{s.path_key}={tmp_path / s.path_key}" for s in STAGES.values()])
    outputs = {}
    for stage in STAGES:
        where = Path(output_dir(config, stage))
        outputs[stage] = {"metrics": str(where / "metrics.json"), "plots": str(where / "plots"), "mlflow_run_id": "x"}
    outputs["sft"]["skipped"] = "unchanged"
    print_summary(config, outputs, 1.0, prefect=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if " outputs " in line]
    assert len(lines) == len(STAGES)
    sft = next(line for line in lines if "sft outputs" in line)
    assert "metrics.json plots" in sft and "unchanged: skipped" in sft and "mlflow_run_id" not in sft


def test_a_stop_signal_landing_in_a_finaliser_is_delivered_again(monkeypatch):
    """Python ignores an exception raised inside ``__del__``: a Ctrl-C that arrives while the garbage collector
    runs one would be lost and the run would go on (seen: the KeyboardInterrupt printed as 'Exception ignored in
    Group.__del__'). The handler sends the signal again instead of raising there; anywhere else it raises."""
    import os
    import signal

    import pytest

    from rlhf_core import cli

    monkeypatch.setattr(cli, "_stop_requested", [])
    scheduled = []

    class Timer:
        def __init__(self, delay, function, args):
            scheduled.append((function, args))

        def start(self):
            pass

    monkeypatch.setattr(cli.threading, "Timer", Timer)

    class Finalised:
        def __del__(self):
            cli._stop(signal.SIGINT, sys._getframe())

    obj = Finalised()
    del obj
    assert scheduled == [(os.kill, (os.getpid(), signal.SIGINT))]
    with pytest.raises(KeyboardInterrupt):
        cli._stop(signal.SIGTERM, sys._getframe())
    assert cli._stop_requested == ["SIGINT", "SIGTERM"]

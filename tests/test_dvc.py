"""`dvc repro` runs the six stages of dvc.yaml on a tiny configuration, and `dvc exp run -S` compares a preset.

The project is copied into a fresh git + DVC repository with a tiny params.yaml, then driven with the README's
commands. The `rlhf` executable is the one installed beside the running Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "sft", "rm", "rm-eval", "ppo", "eval"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return env


def _failed(args: list[str], code: int, stdout: str, stderr: str) -> None:
    pytest.fail(f"{' '.join(args)} exited {code}\n{stdout[-3000:]}\n{stderr[-3000:]}")


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        _failed(args, done.returncode, done.stdout, done.stderr)
    return done.stdout


def _tiny_project(project: Path) -> Path:
    """``project``: the code, dvc.yaml and a tiny params.yaml in a fresh git + DVC repository (nothing committed)."""
    from rlhf_core.config import load_config

    project.mkdir()
    shutil.copytree(REPO / "rlhf_core", project / "rlhf_core", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):  # the real .gitignore: metrics must reach git
        shutil.copy(REPO / name, project / name)
    config = load_config(REPO / "params.yaml", [*TINY, "tracking.enabled=false"])
    (project / "params.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)
    return project


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    """`rlhf run --no-prefect` (params.yaml, every stage, no --set) started in a tiny project of its own, where it
    runs beside the `dvc repro` of ``reproduced`` (which asks for this fixture first): the two pipelines share the
    2 cores instead of taking turns. Yields (project, its process, its stdout and stderr files)."""
    root = tmp_path_factory.mktemp("rlhf_run")
    project, args = _tiny_project(root / "project"), ["rlhf", "run", "--no-prefect"]
    logs = root / "stdout.txt", root / "stderr.txt"
    env = {**_env(), "OMP_NUM_THREADS": "1"}  # one core: the repro's stages have the other
    with logs[0].open("w") as stdout, logs[1].open("w") as stderr:
        proc = subprocess.Popen(args, cwd=project, env=env, stdout=stdout, stderr=stderr, text=True)
    yield project, proc, logs
    if proc.poll() is None:  # only the repro's tests ran
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    project = _tiny_project(tmp_path_factory.mktemp("dvc") / "project")
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "tiny project"], project)
    return project


@pytest.fixture(scope="module")
def reproduced(rlhf_run, dvc_project) -> tuple[Path, str]:
    """The tiny project after one `dvc repro`, its results committed as the experiments' baseline: (project, what
    the repro printed). The tests that need a reproduced project take this, so none depends on another's order."""
    out = _run(["dvc", "repro"], dvc_project)
    _run(["git", "add", "-A"], dvc_project)
    _run(["git", "commit", "-qm", "baseline"], dvc_project)
    return dvc_project, out


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_nothing(reproduced):
    project, out = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES

    again = _run(["dvc", "repro"], project)
    assert "Running stage" not in again  # every stage is up to date

    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], project))
    shown = json.dumps(metrics)
    for key in ("sft/ppl", "rm_eval/gold_accuracy", "ppo/objective_kl", "eval/gold/win_rate"):
        assert f'"{key}"' in shown, key
    win_rate = json.loads((project / "outputs/eval/metrics.json").read_text())["eval/win_rate"]
    assert f'"eval/win_rate": {json.dumps(win_rate)}' in shown, "DVC shows the stage's own number"


@pytest.mark.slow
def test_dvc_exp_run_compares_a_preset(reproduced):
    dvc_project, _ = reproduced
    out = _run(["dvc", "exp", "run", "-S", "ppo.preset=vanilla"], dvc_project)
    assert "Running stage 'ppo'" in out and "Running stage 'eval'" in out
    assert "Running stage 'sft'" not in out  # upstream stages come from the cache

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], dvc_project))
    presets = set()
    for commit in shown:
        for run in [commit, *(e for exp in commit.get("experiments") or [] for e in exp.get("revs", []))]:
            params = ((run.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = ((run.get("data") or {}).get("metrics") or {}).get("outputs/eval/metrics.json", {})
            if params and "eval/win_rate" in metrics.get("data", {}):
                presets.add((run["rev"], params["ppo"]["preset"]))
    # The baseline commit and the experiment both carry their metrics (not only the workspace).
    assert {preset for rev, preset in presets if rev != "workspace"} == {"ppo_max", "vanilla"}


@pytest.mark.slow
def test_rlhf_run_leaves_dvc_lock_consistent_so_repro_runs_nothing(rlhf_run):
    """The two front doors agree: after `rlhf run` (params.yaml, every stage, no --set) `dvc status` is clean and
    `dvc repro` runs no stage (before, it reran all six: about an hour at the default sizes)."""
    project, proc, logs = rlhf_run
    code = proc.wait(timeout=600)
    out = logs[0].read_text()
    if code != 0:
        _failed(proc.args, code, out, logs[1].read_text())
    assert "dvc.lock records these outputs" in out
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], project)
    assert "Running stage" not in _run(["dvc", "repro"], project)


@pytest.mark.slow
def test_rlhf_plots_draws_every_dvc_plot_offline_on_one_page(reproduced, tmp_path):
    """`dvc plots show` loads vega from a CDN, so offline its 12 interactive plots stay blank. `rlhf plots` draws
    DVC's own filled specs as inline SVG and inlines the PNGs: no script, nothing fetched, every plot has marks.
    With revisions it overlays them (`dvc plots diff`)."""
    import re

    dvc_project, _ = reproduced
    page = tmp_path / "plots.html"
    out = _run(["rlhf", "plots", "--out", str(page)], dvc_project)
    spec = yaml.safe_load((dvc_project / "dvc.yaml").read_text())
    assert f"{len(json.loads(_run(['dvc', 'plots', 'show', '--json'], dvc_project))['data'])} plots in" in out
    text = page.read_text()
    sections = re.findall(r"<section>(.*?)</section>", text, flags=re.S)
    svgs = [s for s in sections if "<svg" in s]
    images = [s for s in sections if "<img" in s]
    assert len(svgs) >= len(spec["plots"]) and len(images) == 6  # the CSV plots and the stages' six PNGs
    for section in svgs:
        assert re.search(r'<path[^>]* d="M[^"]{20,}', section), section[:200]  # drawn lines, not an empty frame
    assert all("src='data:image/png;base64," in s for s in images)
    assert "<script" not in text and not re.search(r"""(src|href)=["']?https?:""", text)

    both = tmp_path / "diff.html"
    _run(["rlhf", "plots", "HEAD", "--out", str(both)], dvc_project)
    assert "HEAD, workspace" in both.read_text()


def _ink(chromium: str, page: Path, shot: Path) -> float:
    """Share of non-white pixels of ``page`` rendered by headless Chromium, in a network namespace of its own
    (no network at all) where the machine allows one."""
    import matplotlib.image

    isolate = ["unshare", "-n"] if shutil.which("unshare") and os.geteuid() == 0 else []
    subprocess.run([*isolate, chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,2000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = matplotlib.image.imread(shot)[..., :3]
    return float((pixels.min(axis=2) < 0.9).mean())


@pytest.mark.slow
def test_the_offline_plots_draw_in_a_headless_browser_without_network(reproduced, tmp_path):
    """Where a Chromium is installed (not on CI; `apt-get install chromium`): DVC's interactive plots, drawn by
    `rlhf plots` and opened with no network, put lines on the page; the same page without them is nearly white."""
    from flows.plots import dvc_plots_json, render_page

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium on this machine")
    dvc_project, _ = reproduced
    plots = dvc_plots_json([], dvc_project)
    interactive = {name: [e for e in entries if e["type"] == "vega"] for name, entries in plots.items()}
    interactive = {name: entries for name, entries in interactive.items() if entries}
    drawn, bare = tmp_path / "drawn.html", tmp_path / "bare.html"
    drawn.write_text(render_page(interactive, "plots"))
    bare.write_text(render_page(dict.fromkeys(interactive, []), "plots"))  # the headings alone
    assert _ink(chromium, drawn, tmp_path / "drawn.png") > 4 * _ink(chromium, bare, tmp_path / "bare.png")

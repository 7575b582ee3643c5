"""``rlhf plots``: the plots of ``dvc.yaml`` as one HTML page that draws without a network.

``dvc plots show`` writes a page whose interactive plots load vega, vega-lite and vega-embed from a CDN, so offline
they stay blank and only the PNGs show. Here DVC still collects the data and fills its own templates
(``dvc plots show --json``, or ``dvc plots diff --json`` for several revisions or experiments). vl-convert, Vega's
renderer packaged as a wheel, then draws each filled Vega-Lite spec as inline SVG, and the PNG plots are embedded
as data URIs. The page has no script and loads nothing, so it opens the same offline, from an archive or as
an MLflow artifact.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf_core.errors import DataError
from rlhf_core.io import atomic_write_text


def dvc_executable() -> str:
    """``dvc`` on PATH, else the one installed beside this Python (a venv not activated)."""
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def dvc_plots_json(revisions: list[str], cwd: Path) -> dict[str, list[dict]]:
    """DVC's filled plot specs and image paths: ``{plot id: [{"type": "vega"|"image", ...}]}``."""
    if not (cwd / "dvc.yaml").is_file():
        raise DataError(f"no dvc.yaml in {cwd}: run `rlhf plots` in the project directory")
    dvc = dvc_executable()
    command = [dvc, "plots", "diff", *revisions, "--json"] if revisions else [dvc, "plots", "show", "--json"]
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataError(f"`{' '.join(command[1:])}` could not run: {exc}") from None
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise DataError(f"`dvc {' '.join(command[1:])}` failed: {last[0]}")
    plots = json.loads(done.stdout).get("data") or {}
    if not plots:
        raise DataError("DVC found no plots: run the pipeline first (`make run` or `dvc repro`)")
    return plots


def render_page(plots: dict[str, list[dict]], title: str) -> str:
    """The HTML page: one section per plot, Vega-Lite specs as SVG, images inline."""
    import vl_convert

    sections = []
    for plot_id, entries in plots.items():
        figures = []
        for entry in entries:
            if entry["type"] == "vega":
                figures.append(vl_convert.vegalite_to_svg(entry["content"]))
            elif entry["type"] == "image":
                figures.append(_inline_image(Path(entry["url"]), entry.get("revisions", [])))
        revisions = sorted({rev for entry in entries for rev in entry.get("revisions", [])})
        sections.append(
            f"<section><h2>{html.escape(plot_id)}</h2><p class='revs'>{html.escape(', '.join(revisions))}</p>"
            + "".join(f"<figure>{figure}</figure>" for figure in figures)
            + "</section>"
        )
    style = (
        "body{font-family:sans-serif;margin:1.5em}section{display:inline-block;vertical-align:top;margin:0 1.5em "
        "1.5em 0}h2{font-size:1em;margin:0}.revs{color:#666;font-size:.8em;margin:.2em 0}figure{margin:0}"
        "img{max-width:640px}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def _inline_image(path: Path, revisions: list[str]) -> str:
    label = html.escape(", ".join(revisions) or path.name)
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{label}' src='data:image/png;base64,{data}'>"


def write_plots_page(revisions: list[str], out: Path, cwd: Path = Path(".")) -> tuple[Path, int]:
    """Render the project's plots (of ``revisions``, or the workspace) to ``out``; returns it and the plot count."""
    plots = dvc_plots_json(revisions, cwd)
    what = ", ".join(revisions) if revisions else "workspace"
    atomic_write_text(out, render_page(plots, f"RLHF pipeline plots ({what})"))
    return out, len(plots)

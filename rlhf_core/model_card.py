"""The Hugging Face model card (``README.md``) every stage that writes a model puts into its ``model/`` directory,
so the directory can be shared or pushed to a hub as it is.

The card is YAML front matter a hub reads (``base_model``, ``library_name``, ``license``, ``pipeline_tag``,
``tags``) and markdown for people: what the model is and how it loads, its base model, the data and split sizes
(the prepare stage's ``stats.json``), PPO's preset and resolved tricks (``tricks.json``), the stage's metrics with
their intervals, and the command and git commit that made it. It is written by the stage that writes the
model, into the stage's staging directory, so it is committed with the model; metrics that later stages write
about the model (rm-eval, eval) are not in it.

``base_model`` holds a hub model id or nothing: a hub rejects a card whose ``base_model`` is a local path or a
name it does not know. A model of the local store names the hub id its provenance (``source.json``) records, or
the one the store's table of sources knows; a directory, a GGUF file and the tiny model built from scratch have
none, and the markdown says what they are instead.

No date: a rerun by the same command at the same commit with the same weights writes the same card, so DVC, which
hashes the whole ``model/`` directory, still sees an unchanged model. A different command or commit does change
the card: compare weights, not model directories.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core.io import atomic_write_text, read_json
from rlhf_core.models.store import SOURCE_FILE, SOURCES

if TYPE_CHECKING:
    from rlhf_core.config import Config

CARD_FILE = "README.md"
PROJECT = Path(__file__).resolve().parents[1]
PAPER = "Secrets of RLHF in Large Language Models Part I: PPO (Zheng et al., 2023, arXiv:2307.04964)"
SIGNIFICANT_DIGITS = 4  # metrics in the card's table; metrics.json holds them in full
GIT_TIMEOUT_S = 10
LOW, HIGH = "_ci_low", "_ci_high"  # how metrics files name a metric's interval
# A hub model id: "name" or "owner/name" (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class _Kind:
    title: str
    what: str
    pipeline_tag: str
    tags: tuple[str, ...]
    loads_with: str
    data: str  # which splits it learned from


_KINDS = {
    "sft": _Kind(
        "SFT policy",
        "A causal language model fine-tuned on demonstrations (loss on the response tokens only): the policy that "
        "the reward model and PPO start from.",
        "text-generation",
        ("rlhf", "sft"),
        "AutoModelForCausalLM.from_pretrained(directory)",
        "Trained on `sft_train`, validated on `sft_val`.",
    ),
    "rm": _Kind(
        "Reward model",
        "A reward model trained on preference pairs with the ranking loss of the paper's eq. 2: one scalar score "
        "for a prompt and response (the head reads the last token). `reward_stats.json` holds the mean and std of "
        "its scores on SFT-policy answers to PPO prompts.",
        "text-classification",
        ("rlhf", "reward-model"),
        "AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1)",
        "Trained on `rm_train`; a validation hold-out of it (`rm.val_fraction`) picks the checkpoint.",
    ),
    "ppo": _Kind(
        "PPO policy",
        "The SFT policy optimised with PPO against the reward model, with the PPO-max tricks below switched as "
        "the preset and `ppo.tricks` say.",
        "text-generation",
        ("rlhf", "ppo"),
        "AutoModelForCausalLM.from_pretrained(directory)",
        "Rollouts on the `ppo` prompts (PPO-ptx: demonstrations of `sft_train`); compared with the SFT policy on "
        "the `eval` prompts at the end of the run.",
    ),
}


@dataclass(frozen=True)
class _Base:
    """The pretrained model a trained model derives from."""

    name: str  # as the configuration names it
    hub_id: str | None  # for the front matter's base_model
    licence: str | None
    origin: str  # one line: where it came from


def write_model_card(directory: Path, config: Config, stage: str, metrics: dict, tricks: dict | None = None) -> None:
    """Write ``directory/README.md`` (atomically) for the model ``stage`` (sft, rm or ppo) saved there: ``metrics``
    are the stage's headline numbers (what its metrics file holds), ``tricks`` PPO's resolved switches with its
    preset (what it writes as ``tricks.json``)."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = _KINDS[stage]
    base = _base(config.rm.init_from if stage == "rm" and config.rm.init_from else config.model.name_or_path, config)
    title, tags = kind.title, list(kind.tags)
    if tricks is not None:
        preset = tricks["preset"]
        title = f"{'PPO-max' if preset == 'ppo_max' else 'PPO'} policy, preset `{preset}`"
        tags.append(preset.replace("_", "-"))
    data = ModelCardData(
        base_model=base.hub_id if base else None,
        library_name="transformers",
        license=base.licence.lower() if base and base.licence else None,  # SPDX, as the hub spells it
        pipeline_tag=kind.pipeline_tag,
        tags=tags,
    )
    sections = [
        f"# {title}\n\n{kind.what} Made by an RLHF pipeline reproducing *{PAPER}*.\n\n"
        f"Loads with `{kind.loads_with}` (weights in safetensors, tokenizer included).",
        _lineage(stage, base, config),
        _data(kind, config),
        *([_tricks(tricks)] if tricks is not None else []),
        _metrics(metrics),
        _provenance(),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    atomic_write_text(Path(directory) / CARD_FILE, str(card))


def _base(name_or_path: str | None, config: Config) -> _Base | None:
    if name_or_path is None:
        return None
    if name_or_path in SOURCES:
        source = Path(config.model.store) / name_or_path / SOURCE_FILE
        if not source.is_file():  # pulled for SFT, removed since: a finished model is not lost over its card
            return _Base(name_or_path, None, None, f"the local model store (`{config.model.store}`), no longer there")
        provenance = read_json(source)
        origin = (
            f"the local model store (`{config.model.store}`): `{provenance['member']}` of the package "
            f"`{provenance['requirement']}`, GGUF SHA-256 `{provenance['gguf_sha256']}`, converted to float32"
        )
        # A store pulled before source.json recorded the hub id: the table of sources still knows it.
        hub_id = provenance.get("hub_id") or SOURCES[name_or_path].hub_id
        return _Base(name_or_path, hub_id, provenance.get("licence"), origin)
    if Path(name_or_path).suffix == ".gguf":
        return _Base(name_or_path, None, None, "a GGUF file, converted to float32 into the local model store")
    if Path(name_or_path).exists() or not HUB_ID.fullmatch(name_or_path):
        return _Base(name_or_path, None, None, "a local model directory")
    return _Base(name_or_path, name_or_path, None, "the Hugging Face hub")


def _lineage(stage: str, base: _Base | None, config: Config) -> str:
    if base is None:
        lines = ["- Base model: none. A tiny Llama initialised from scratch (`model.name_or_path` unset; its sizes "
                 "are in `config.json`), with a byte-level BPE tokenizer trained on the prepared data."]  # fmt: skip
    else:
        lines = [f"- Base model: `{base.name}`, from {base.origin}."]
        if base.licence:
            lines.append(f"- Base model licence: {base.licence}.")
    sft_model = f"`{Path(config.paths.sft) / 'model'}`"
    if stage == "rm":
        start = f"`{config.rm.init_from}` (`rm.init_from`)" if config.rm.init_from else f"the SFT policy {sft_model}"
        lines.append(f"- Initialised from: {start}.")
    elif stage == "ppo":
        rewards = [str(Path(config.paths.rm) / "model"), *config.ppo.reward_ensemble]
        lines.append(f"- Initialised from: the SFT policy {sft_model}, which is also the KL reference.")
        lines.append("- Reward model: " + ", ".join(f"`{r}`" for r in rewards) + ".")
    return "## Model\n\n" + "\n".join(lines)


def _data(kind: _Kind, config: Config) -> str:
    source = config.data.source
    files = {"hh_rlhf": [config.data.path], "jsonl": [config.data.sft_file, config.data.rm_file, config.data.ppo_file]}
    origin = ", ".join(f"`{f}`" for f in files.get(source, [])) or "the built-in simulated assistant domain"
    head = f"## Data\n\nSource: `{source}` ({origin}). {kind.data}"
    stats = Path(config.paths.data) / "stats.json"
    if not stats.is_file():  # splits written by hand (tests, benchmarks): a finished model is not lost over this
        return f"{head} Split sizes unknown: `{config.paths.data}` holds no `stats.json` of `rlhf prepare`."
    rows = "\n".join(f"| `{split}` | {count} |" for split, count in read_json(stats)["counts"].items())
    return f"{head} The prepared splits (`stats.json`):\n\n| split | rows |\n| --- | --- |\n{rows}"


def _tricks(tricks: dict) -> str:
    rows = "\n".join(f"| `{name}` | {_value(value)} |" for name, value in tricks.items() if name != "preset")
    return (
        f"## PPO-max tricks\n\nPreset `{tricks['preset']}`, with the `ppo.tricks` overrides applied (`tricks.json`; "
        f"the paper's sec. 5):\n\n| switch | value |\n| --- | --- |\n{rows}"
    )


def _metrics(metrics: dict) -> str:
    intervals = {key[: -len(LOW)] for key in metrics if key.endswith(LOW) and key[: -len(LOW)] + HIGH in metrics}
    rows = []
    for key, value in metrics.items():
        if any(key == name + end for name in intervals for end in (LOW, HIGH)):
            continue
        interval = f"[{_value(metrics[key + LOW])}, {_value(metrics[key + HIGH])}]" if key in intervals else ""
        rows.append(f"| `{key}` | {_value(value)} | {interval} |")
    return (
        "## Metrics\n\nAs the stage measured them (`metrics.json`, which also holds the stage's run time), intervals "
        "from its `_ci_low` and `_ci_high` values.\n\n| metric | value | interval |\n| --- | --- | --- |\n"
        + "\n".join(rows)
    )


def _value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    return "none" if value is None else str(value)


def _provenance() -> str:
    commit = _git_commit()
    lines = [
        f"- Command: `{_command()}`",
        f"- Git commit: `{commit}`" if commit else "- Git commit: none (the code is not in a git work tree)",
        "- Configuration: every setting of the run is in `config.yaml` in the stage's directory, beside this one.",
    ]
    return "## How it was made\n\n" + "\n".join(lines)


def _command() -> str:
    """The command line as typed: ``rlhf ppo --set ...`` rather than the script's full path; a module run as a
    script (``python -m rlhf_core.cli``, torchrun's ``-m``) by its module name."""
    program = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path("python")
    if program.suffix == ".py" and program.is_relative_to(PROJECT):
        head = ["python", "-m", ".".join(program.relative_to(PROJECT).with_suffix("").parts)]
    elif program.name == "__main__.py":  # python -m some_tool
        head = ["python", "-m", program.parent.name]
    else:
        head = [program.name]
    return shlex.join([*head, *sys.argv[1:]])


def _git_commit() -> str | None:
    """The code's commit, ``-dirty`` when tracked files differ from it (untracked ones, such as outputs, do not
    count: ``git describe --dirty``'s rule); None outside a git work tree."""
    git = ["git", "--no-optional-locks", "-C", str(PROJECT)]  # no index refresh: never contends with a user's git
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=GIT_TIMEOUT_S).stdout.strip()  # fmt: skip
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, timeout=GIT_TIMEOUT_S).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if changed else "")

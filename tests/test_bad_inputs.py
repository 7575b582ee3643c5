"""The bad-input corpus: mistakes a user makes and files that arrive damaged, each run through the real ``rlhf``
command (in-process, so the corpus stays fast) in a copy of a small prepared project.

Every case asserts the same four things: the exit status (2 for configuration, 1 for data and files), no Python
traceback, a message naming the file, line or key at fault, and a project tree byte-identical to the one before
the command (nothing written, nothing deleted). A case is ``(id, setup, args, status, expected words)``: ``setup``
damages the project copy and returns extra ``--set`` overrides.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY, PicklePayload

CONFIG, DATA = 2, 1  # exit statuses of a configuration error and of every other user error


# ------------------------------------------------------------------------------------------------- the project
@pytest.fixture(scope="session")
def template_project(trained_tiny_rm, prepared_tiny, tmp_path_factory) -> Path:
    """A project directory as a user has it after `rlhf prepare`, `rlhf sft` and `rlhf rm` (tiny sizes): relative
    output paths under ``outputs/`` and a ``params.yaml`` holding the tiny settings, tracking off."""
    from rlhf_core.config import PathsConfig, config_to_dict, load_config

    rm_root, _ = trained_tiny_rm
    prepared_root, _ = prepared_tiny
    project = tmp_path_factory.mktemp("template_project")
    shutil.copytree(prepared_root / "data", project / "outputs" / "data")
    for stage in ("sft", "rm"):
        shutil.copytree(rm_root / stage, project / "outputs" / stage)
    tree = config_to_dict(load_config(None, [*TINY, "tracking.enabled=false"]))
    tree["paths"] = {k: f"outputs/{k}" for k in PathsConfig.model_fields}
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    _with_ppo_checkpoints(project)
    return project


def _with_ppo_checkpoints(project: Path) -> None:
    """A finished 4-iteration PPO run (its checkpoint of iteration 2 stays in outputs/ppo/checkpoints/); a rerun
    with more iterations (``MORE``) resumes from it. The run's outputs go: only the checkpoints are kept."""
    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    cwd = Path.cwd()
    os.chdir(project)
    try:
        run_stage("ppo", load_config(project / "params.yaml"))
    finally:
        os.chdir(cwd)
    ppo = project / "outputs" / "ppo"
    for entry in ppo.iterdir():
        if entry.name != "checkpoints":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert [p.name for p in (ppo / "checkpoints").iterdir()] == ["step-000002"]


@pytest.fixture
def project(template_project, tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(template_project, copy)
    monkeypatch.chdir(copy)
    return copy


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: path -> content hash ("dir" for folders)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(args: list[str]):
    from flows.cli import app  # the console script's app: the stage commands plus `rlhf run`

    return CliRunner().invoke(app, args)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path], list[str] | None]  # damages the project; returns extra --set overrides
    command: str  # the rlhf subcommand
    status: int
    words: tuple[str, ...]  # what the message must contain (the file, line or key at fault)

    def __str__(self) -> str:
        return self.id


# ------------------------------------------------------------------------------------------------- helpers
def params_text(project: Path) -> str:
    return (project / "params.yaml").read_text()


def write_params(project: Path, text: str | bytes) -> None:
    path = project / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def edit_params(project: Path, group: str, key: str, value) -> None:
    tree = yaml.safe_load(params_text(project))
    node = tree
    for part in group.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    write_params(project, yaml.safe_dump(tree, sort_keys=False))


def jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD_SFT = [{"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}."} for i in range(40)]
GOOD_RM = [{"prompt": f"Name {i}?", "chosen": f"It is {i}.", "rejected": "No idea."} for i in range(40)]
GOOD_PPO = [{"prompt": f"Say {i}."} for i in range(40)]


def jsonl_source(project: Path, sft=None, rm=None, ppo=None, suffix: str = ".jsonl") -> list[str]:
    """Three JSONL files in ``inputs/`` (good rows unless given) and the settings that read them."""
    inputs = project / "inputs"
    inputs.mkdir(exist_ok=True)
    files = {}
    for name, rows in (("sft", sft or GOOD_SFT), ("rm", rm or GOOD_RM), ("ppo", ppo or GOOD_PPO)):
        path = inputs / f"{name}{suffix}"
        payload = rows if isinstance(rows, bytes) else jsonl(rows)
        path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
        files[name] = f"inputs/{name}{suffix}"
    return ["data.source=jsonl", *(f"data.{k}_file={v}" for k, v in files.items())]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def sets(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda project: list(overrides)


def params(text: str | bytes) -> Callable[[Path], None]:
    return lambda project: write_params(project, text)


def append_params(text: str) -> Callable[[Path], None]:
    return lambda project: write_params(project, params_text(project) + text)


# ------------------------------------------------------------------------------------- the params file and --set
CONFIG_CASES = [
    Case("params-not-utf8", params(b"sft:\n  lr: 0.001 # caf\xe9\n"), "sft", CONFIG, ("params.yaml:2", "not UTF-8")),
    Case("params-latin1-value", params(b"data:\n  seed: 1\nsft:\n  lr: \xb5\n"), "sft", CONFIG, ("params.yaml:4",)),
    Case("params-duplicate-key", params("sft:\n  lr: 0.001\n  lr: 0.002\n"), "sft", CONFIG,
         ("params.yaml:3", "'lr' is given twice", "line 2")),
    Case("params-duplicate-group", append_params("sft:\n  epochs: 1\n"), "sft", CONFIG, ("'sft' is given twice",)),
    Case("params-duplicate-nested-key", params("data:\n  sim:\n    flaw_prob: 0.4\n    flaw_prob: 0.5\n"), "prepare",
         CONFIG, ("params.yaml:4", "flaw_prob")),
    Case("params-empty", params(""), "sft", CONFIG, ("params.yaml", "empty")),
    Case("params-only-comments", params("# nothing here\n\n"), "sft", CONFIG, ("params.yaml", "empty")),
    Case("params-bad-yaml", params("sft:\n  lr: [1,\n"), "sft", CONFIG, ("params.yaml", "not valid YAML")),
    Case("params-bad-indent", params("sft:\n  lr: 1\n bad: 2\n"), "sft", CONFIG, ("params.yaml", "not valid YAML")),
    Case("params-nul-bytes", params(b"sft:\n  lr: 1\x00\n"), "sft", CONFIG, ("params.yaml",)),
    Case("params-top-level-list", params("- sft\n- rm\n"), "sft", CONFIG, ("params.yaml", "mapping of groups")),
    Case("params-missing", lambda p: (p / "params.yaml").unlink(), "sft", CONFIG, ("params file not found",)),
    Case("params-is-a-directory", lambda p: (p / "params.yaml").unlink() or (p / "params.yaml").mkdir(), "sft",
         CONFIG, ("params file not found", "params.yaml")),
    Case("unknown-group", append_params("optimiser:\n  lr: 1\n"), "sft", CONFIG, ("unknown key 'optimiser'",)),
    Case("unknown-key", lambda p: edit_params(p, "sft", "learning_rate", 1e-3), "sft", CONFIG,
         ("unknown key 'sft.learning_rate'", "allowed here")),
    Case("moved-key", lambda p: edit_params(p, "ppo", "policy_lr", 1e-5), "ppo", CONFIG,
         ("'ppo.policy_lr' has moved", "ppo.policy_optim.lr")),
    Case("wrong-type", sets("sft.lr=fast"), "sft", CONFIG, ("sft.lr = 'fast'",)),
    Case("out-of-range", sets("sft.lr=-1"), "sft", CONFIG, ("sft.lr = -1", "greater than 0")),
    Case("infinite-kl-coef", sets("ppo.kl_coef=.inf"), "ppo", CONFIG, ("ppo.kl_coef", "finite")),
    Case("nan-gamma", sets("ppo.gamma=.nan"), "ppo", CONFIG, ("ppo.gamma", "finite")),
    Case("infinite-lr-in-file", lambda p: edit_params(p, "rm", "lr", float("inf")), "rm", CONFIG, ("rm.lr", "finite")),
    Case("set-without-equals", sets("sft.lr"), "sft", CONFIG, ("--set 'sft.lr'", "group.key=value")),
    Case("set-without-group", sets("lr=1"), "sft", CONFIG, ("--set 'lr=1'", "group")),
    Case("set-into-a-value", sets("sft.lr.x=1"), "sft", CONFIG, ("'sft.lr' is a value",)),
    Case("set-group-to-value", sets("data.sim=3"), "prepare", CONFIG, ("data.sim",)),
    Case("hh-without-path", sets("data.source=hh_rlhf", "data.path=null"), "prepare", CONFIG, ("data.path",)),
    Case("jsonl-without-files", sets("data.source=jsonl"), "prepare", CONFIG, ("data.sft_file",)),
    Case("mlflow-uri-unknown-scheme", sets("tracking.enabled=true", "tracking.uri=bogus://nowhere"), "prepare", CONFIG,
         ("tracking.uri='bogus://nowhere'", "sqlite:///", "http(s)://")),
    Case("unknown-source", sets("data.source=csv"), "prepare", CONFIG, ("data.source = 'csv'",)),
    Case("heads-do-not-divide", sets("model.num_heads=3"), "sft", CONFIG, ("model.num_heads=3",)),
    Case("ppo-sizes-do-not-divide", sets("ppo.rollout_size=10", "ppo.minibatch_size=4"), "ppo", CONFIG,
         ("ppo.",)),
    Case("lora-with-zero3", sets("model.lora.enabled=true", "distributed.engine=deepspeed", "distributed.zero_stage=3"),
         "sft", CONFIG, ("model.lora.enabled", "zero_stage=3")),
    Case("sequence-too-long", sets("data.max_prompt_tokens=200", "data.max_response_tokens=100"), "prepare", CONFIG,
         ("max_position_embeddings",)),
    Case("gguf-missing", sets("model.name_or_path=nowhere/model.gguf"), "prepare", CONFIG,
         ("model.name_or_path=nowhere/model.gguf", "no such GGUF file")),
    Case("store-model-not-pulled", sets("model.name_or_path=smollm2-135m-instruct", "model.store=emptystore"),
         "prepare", CONFIG, ("rlhf models pull smollm2-135m-instruct",)),
]  # fmt: skip


def _user_folder(project: Path) -> list[str]:
    folder = project / "my_notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / "model").mkdir()
    return ["paths.ppo=my_notes"]


def _other_stage_dir(project: Path) -> list[str]:
    return ["paths.sft=outputs/rm", "paths.rm=outputs/rm2"]


def _file_in_the_way(project: Path) -> list[str]:
    (project / "outputs" / "eval").write_text("not a directory\n")
    return []


def _file_above(project: Path) -> list[str]:
    (project / "blocker").write_text("a file\n")
    return ["paths.rm_eval=blocker/rm_eval"]


def _sqlite_under_a_file(project: Path) -> list[str]:
    (project / "blocker").write_text("a file\n")
    return ["tracking.enabled=true", "tracking.uri=sqlite:///blocker/mlflow.db"]


def _sqlite_is_a_directory(project: Path) -> list[str]:
    (project / "mlflow.db").mkdir()
    return ["tracking.enabled=true", "tracking.uri=sqlite:///mlflow.db"]


# ---------------------------------------------------------------------------------------------- output paths
PATH_CASES = [
    Case("rm-over-sft", sets("paths.rm=outputs/sft"), "rm", CONFIG, ("paths.sft", "paths.rm", "overlap")),
    Case("sft-inside-data", sets("paths.sft=outputs/data/sft"), "sft", CONFIG, ("paths.data", "paths.sft", "overlap")),
    Case("data-inside-eval", sets("paths.data=outputs/eval/data"), "prepare", CONFIG, ("paths.data", "overlap")),
    Case("two-stages-one-dir", sets("paths.rm_eval=outputs/x", "paths.eval=outputs/x/"), "eval", CONFIG,
         ("paths.rm_eval", "paths.eval")),
    Case("ppo-is-project", sets("paths.ppo=."), "ppo", CONFIG, ("paths.ppo='.'", "project directory")),
    Case("ppo-is-project-spelled-out", lambda p: [f"paths.ppo={p}"], "ppo", CONFIG, ("paths.ppo", "project directory")),
    Case("sft-is-parent", sets("paths.sft=.."), "sft", CONFIG, ("paths.sft='..'", "project directory")),
    Case("sft-escapes", sets("paths.sft=../../x"), "sft", CONFIG, ("paths.sft='../../x'", "leaves the project")),
    Case("sft-escapes-via-outputs", sets("paths.sft=outputs/../../y"), "sft", CONFIG, ("leaves the project",)),
    Case("ppo-is-root", sets("paths.ppo=/"), "ppo", CONFIG, ("paths.ppo='/'",)),
    Case("ppo-under-tilde", sets("paths.ppo=~/runs"), "ppo", CONFIG, ("paths.ppo='~/runs'", "full path")),
    Case("ppo-is-home-by-name", lambda p: [f"paths.ppo={Path.home()}"], "ppo", CONFIG, ("paths.ppo", "home")),
    Case("empty-path", sets("paths.eval="), "eval", CONFIG, ("paths.eval",)),
    Case("control-character-path", sets("paths.eval=outputs/e\tval"), "eval", CONFIG, ("control character",)),
    Case("user-folder-as-output", _user_folder, "ppo", CONFIG, ("paths.ppo=my_notes", "thesis.tex")),
    Case("another-stages-outputs", _other_stage_dir, "sft", CONFIG, ("paths.sft=outputs/rm", "rm stage")),
    Case("output-is-a-file", _file_in_the_way, "eval", CONFIG, ("paths.eval", "is a file")),
    Case("output-under-a-file", _file_above, "rm-eval", CONFIG, ("paths.rm_eval", "blocker", "is a file")),
    Case("data-path-is-a-file", lambda p: ["paths.data=params.yaml"], "prepare", CONFIG, ("paths.data=params.yaml",)),
    Case("mlflow-db-under-a-file", _sqlite_under_a_file, "rm-eval", CONFIG, ("tracking.uri", "blocker")),
    Case("mlflow-db-is-a-directory", _sqlite_is_a_directory, "rm-eval", CONFIG, ("tracking.uri", "directory")),
]  # fmt: skip


def with_sft_rows(*bad_rows, suffix: str = ".jsonl") -> Callable[[Path], list[str]]:
    """The SFT file: good rows with ``bad_rows`` inserted from line 3."""
    return lambda project: jsonl_source(project, sft=[*GOOD_SFT[:2], *bad_rows, *GOOD_SFT[2:]], suffix=suffix)


def with_rm_rows(*bad_rows) -> Callable[[Path], list[str]]:
    return lambda project: jsonl_source(project, rm=[*GOOD_RM[:2], *bad_rows, *GOOD_RM[2:]])


def _truncated_gz(which: str) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        many = [{"prompt": f"Question number {i}?", "response": f"Answer {i}."} for i in range(3000)]
        overrides = jsonl_source(project, sft=many, suffix=".jsonl.gz")
        truncate(project / "inputs" / f"{which}.jsonl.gz")
        return overrides

    return setup


def _not_gzip(project: Path) -> list[str]:
    overrides = jsonl_source(project, suffix=".jsonl.gz")
    (project / "inputs" / "rm.jsonl.gz").write_bytes(b"plain text, not gzip")
    return overrides


def _hh_file(project: Path, payload: bytes, name: str = "hh.jsonl") -> list[str]:
    (project / name).write_bytes(payload)
    return ["data.source=hh_rlhf", f"data.path={name}"]


def _truncated_hh(project: Path) -> list[str]:
    pair = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    overrides = _hh_file(project, gzip.compress(jsonl([pair] * 5000)), "hh.jsonl.gz")
    truncate(project / "hh.jsonl.gz", 0.3)
    return overrides


HH_OTHER_DIALOGUE = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Bye?\n\nAssistant: No."}
USER_HI, USER_BYE = {"role": "user", "content": "Hi?"}, {"role": "user", "content": "Bye?"}
ANSWER_A = {"role": "assistant", "content": "A."}
SAME_ANSWERS = {"prompt": "Hi?", "chosen": "A.", "rejected": "A."}


def _write(project: Path, name: str, payload: bytes, setting: str = "ppo") -> str:
    """``inputs/<name>`` with ``payload``; the override that points ``data.<setting>_file`` at it."""
    (project / "inputs" / name).write_bytes(payload)
    return f"data.{setting}_file=inputs/{name}"


def _table_source(which: str, file_format: str, bad_row: dict) -> Callable[[Path], list[str]]:
    """Good files, and ``which`` as parquet or a saved dataset with ``bad_row`` at row 2."""

    def setup(project: Path) -> list[str]:
        import datasets

        good = {"sft": GOOD_SFT, "rm": GOOD_RM}[which]
        table = datasets.Dataset.from_list([*good[:2], bad_row, *good[2:]])
        if file_format == "parquet":
            table.to_parquet(project / "inputs" / f"{which}.parquet")
            return [*jsonl_source(project), f"data.{which}_file=inputs/{which}.parquet"]
        table.save_to_disk(str(project / "inputs" / which))
        return [*jsonl_source(project), f"data.{which}_file=inputs/{which}"]

    return setup


def _dataset_dict(project: Path) -> list[str]:
    import datasets

    rows = datasets.Dataset.from_list(GOOD_RM)
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(project / "inputs" / "rm"))
    return [*jsonl_source(project), "data.rm_file=inputs/rm"]


HH_BROKEN = {"chosen": "no turns at all", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."}
HH_NUL = {"chosen": "\n\nHuman: Hi\x00?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\x00?\n\nAssistant: No."}

# ---------------------------------------------------------------------------------------------------- data
DATA_CASES = [
    Case("sft-file-missing", lambda p: [*jsonl_source(p), "data.sft_file=inputs/nope.jsonl"], "prepare", DATA,
         ("data file not found", "inputs/nope.jsonl")),
    Case("sft-file-is-a-directory", lambda p: [*jsonl_source(p), "data.sft_file=inputs"], "prepare", DATA,
         ("inputs",)),
    Case("bad-json", with_sft_rows(b'{"prompt": "Hi?", "response": '), "prepare", DATA,
         ("inputs/sft.jsonl:3", "bad JSON")),
    Case("bad-byte", with_sft_rows(b'{"prompt": "Caf\xe9?", "response": "Yes."}'), "prepare", DATA,
         ("inputs/sft.jsonl:3", "not UTF-8", "0xe9")),
    Case("nul-in-prompt", with_sft_rows({"prompt": "Hi\x00?", "response": "Hello."}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "U+0000", "'prompt'")),
    Case("escape-in-response", with_sft_rows({"prompt": "Hi?", "response": "Hel\x1blo."}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "U+001B", "'response'")),
    Case("bell-in-chosen", with_rm_rows({"prompt": "Hi?", "chosen": "A\x07.", "rejected": "B."}), "prepare", DATA,
         ("inputs/rm.jsonl:3", "U+0007")),
    Case("missing-field", with_sft_rows({"prompt": "Hi?"}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "missing field 'response'")),
    Case("number-field", with_sft_rows({"prompt": "Hi?", "response": 42}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "must be text or a list of {role, content} messages, got number")),
    Case("empty-field", with_sft_rows({"prompt": "   ", "response": "Hello."}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "empty field 'prompt'")),
    Case("over-long-field", with_sft_rows({"prompt": "Hi?", "response": "x" * 5000}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "over-long field 'response'")),
    Case("identical-pair", with_rm_rows({"prompt": "Hi?", "chosen": "Same.", "rejected": " Same. "}), "prepare",
         DATA, ("inputs/rm.jsonl:3", "identical chosen and rejected")),
    Case("array-row", with_sft_rows(["Hi?", "Hello."]), "prepare", DATA,
         ("inputs/sft.jsonl:3", "expected a JSON object")),
    Case("truncated-gz-sft", _truncated_gz("sft"), "prepare", DATA, ("inputs/sft.jsonl.gz", "truncated or damaged")),
    Case("not-gzip", _not_gzip, "prepare", DATA, ("inputs/rm.jsonl.gz", "truncated or damaged")),
    Case("truncated-gz-hh", _truncated_hh, "prepare", DATA, ("hh.jsonl.gz", "truncated or damaged")),
    Case("hh-not-a-transcript", lambda p: _hh_file(p, jsonl([HH_BROKEN])), "prepare", DATA,
         ("hh.jsonl:1", "not an HH-RLHF transcript")),
    Case("hh-nul", lambda p: _hh_file(p, jsonl([HH_NUL])), "prepare", DATA, ("hh.jsonl:1", "U+0000")),
    Case("hh-bad-byte", lambda p: _hh_file(p, b'{"chosen": "\xff"}\n'), "prepare", DATA, ("hh.jsonl:1", "not UTF-8")),
    Case("hh-missing", lambda p: ["data.source=hh_rlhf", "data.path=nowhere.jsonl"], "prepare", DATA,
         ("nowhere.jsonl",)),
    Case("hh-every-history-differs", lambda p: _hh_file(p, jsonl([HH_OTHER_DIALOGUE] * 30)), "prepare", DATA,
         ("hh.jsonl", "30 pairs dropped because their transcripts continue different dialogues", "lines 1, 2, 3")),
    # the formats of TRL, OpenRLHF and verl: the row named by its index in a table
    Case("parquet-null-field", _table_source("sft", "parquet", {"prompt": "Hi?", "response": None}), "prepare", DATA,
         ("inputs/sft.parquet row 2", "field 'response' must be text", "got null")),
    Case("saved-dataset-bad-pair", _table_source("rm", "hf_dataset", SAME_ANSWERS), "prepare", DATA,
         ("inputs/rm row 2", "identical chosen and rejected")),
    Case("saved-dataset-two-splits", _dataset_dict, "prepare", DATA,
         ("inputs/rm holds the splits", "inputs/rm/")),
    Case("json-array-broken", lambda p: [*jsonl_source(p), _write(p, "ppo.json", b'[{"prompt": "a?"},\n{"prompt": ')],
         "prepare", DATA, ("inputs/ppo.json:2", "bad JSON")),
    Case("empty-file", lambda p: [*jsonl_source(p), _write(p, "sft.jsonl", b"", "sft")], "prepare", DATA,
         ("inputs/sft.jsonl is empty (0 bytes)",)),
    Case("empty-gz-file", lambda p: [*jsonl_source(p), _write(p, "rm.jsonl.gz", b"", "rm")], "prepare", DATA,
         ("inputs/rm.jsonl.gz is empty (0 bytes)",)),
    Case("unknown-suffix", lambda p: [*jsonl_source(p), _write(p, "ppo.txt", jsonl(GOOD_PPO))], "prepare", DATA,
         ("inputs/ppo.txt", "cannot tell the format", "data.file_format")),
    Case("implicit-pair-differs", with_rm_rows({"chosen": [USER_HI, ANSWER_A], "rejected": [USER_BYE, ANSWER_A]}),
         "prepare", DATA, ("inputs/rm.jsonl:3", "prompts differ", "message 0")),
    Case("message-role", with_sft_rows({"messages": [USER_HI, {"role": "tool", "content": "42"}]}), "prepare", DATA,
         ("inputs/sft.jsonl:3", "role 'tool' is not one of system, user, assistant")),
]  # fmt: skip


def _model_copy(project: Path, damage: Callable[[Path], None], source: str = "outputs/sft/model") -> Path:
    copy = project / "mymodel"
    shutil.copytree(project / source, copy)
    damage(copy)
    return copy


def empty_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"")


def half_weights(model: Path) -> None:
    truncate(model / "model.safetensors")


def other_size(model: Path) -> None:
    """The config of a model twice as wide as its weights (or weights of another model under this config)."""
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] *= 2
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))


def garbage_config(model: Path) -> None:
    (model / "config.json").write_text("{ this is not json")


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff")


def damaged_in_place(relative: str, damage: Callable[[Path], object]) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        damage(project / relative)

    return setup


# ---------------------------------------------------------------------------------------- models and tokenizers
MODEL_CASES = [
    Case("policy-dir-missing", sets("model.name_or_path=./nowhere"), "prepare", DATA,
         ("model.name_or_path=./nowhere", "no such directory")),
    Case("policy-zero-byte-weights", lambda p: [f"model.name_or_path={_model_copy(p, empty_weights)}"], "sft", DATA,
         ("model.name_or_path=", "mymodel", "cannot load it")),
    Case("policy-truncated-weights", lambda p: [f"model.name_or_path={_model_copy(p, half_weights)}"], "sft", DATA,
         ("model.name_or_path=", "mymodel", "cannot load it")),
    Case("policy-other-size", lambda p: [f"model.name_or_path={_model_copy(p, other_size)}"], "sft", DATA,
         ("mymodel", "cannot load it")),
    Case("rm-init-missing", sets("rm.init_from=outputs/nothing/model"), "rm", DATA,
         ("rm.init_from=outputs/nothing/model", "no such directory")),
    Case("rm-init-zero-byte", lambda p: [f"rm.init_from={_model_copy(p, empty_weights)}"], "rm", DATA,
         ("rm.init_from=", "mymodel", "cannot load it")),
    Case("rm-init-garbage-config", lambda p: [f"rm.init_from={_model_copy(p, garbage_config)}"], "rm", DATA,
         ("rm.init_from=", "mymodel")),
    Case("sft-model-other-size-read-by-rm", damaged_in_place("outputs/sft/model", other_size), "rm", DATA,
         ("outputs/sft/model", "cannot load it", "`rlhf sft`")),
    Case("rm-model-truncated-read-by-ppo", damaged_in_place("outputs/rm/model", half_weights), "ppo", DATA,
         ("outputs/rm/model", "cannot load it", "`rlhf rm`")),
    Case("rm-model-zero-byte-read-by-rm-eval", damaged_in_place("outputs/rm/model", empty_weights), "rm-eval", DATA,
         ("outputs/rm/model", "cannot load it")),
    Case("sft-model-truncated-read-by-ppo", damaged_in_place("outputs/sft/model", half_weights), "ppo", DATA,
         ("outputs/sft/model", "cannot load it")),
    Case("tokenizer-damaged", damaged_in_place("outputs/data/tokenizer/tokenizer.json", truncate), "sft", DATA,
         ("outputs/data/tokenizer", "cannot load it")),
    Case("reward-stats-damaged", damaged_in_place("outputs/rm/model/reward_stats.json", truncate), "ppo", DATA,
         ("outputs/rm/model/reward_stats.json", "cannot read it as JSON")),
    Case("rm-checkpoint-list-damaged", damaged_in_place("outputs/rm/checkpoints.json", not_utf8), "rm-eval", DATA,
         ("outputs/rm/checkpoints.json", "cannot read it as JSON")),
    Case("no-reward-model-for-rm-eval", lambda p: shutil.rmtree(p / "outputs" / "rm"), "rm-eval", DATA,
         ("outputs/rm/model", "rlhf rm")),
    Case("no-policy-for-eval", lambda p: None, "eval", DATA, ("outputs/ppo/model", "rlhf ppo")),
    Case("no-data-for-sft", lambda p: shutil.rmtree(p / "outputs" / "data"), "sft", DATA, ("outputs/data",)),
]  # fmt: skip


MORE = "ppo.steps=6"  # the resume fingerprint leaves out ppo.steps: a longer run resumes the checkpoint


def in_checkpoint(relative: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(project: Path) -> list[str]:
        damage(project / "outputs" / "ppo" / "checkpoints" / "step-000002" / relative)
        return [MORE]

    return setup


def plant_pickle(path: Path) -> None:
    import torch

    torch.save({"module": PicklePayload(path.parent / "PWNED")}, path)


def plant_pickle_and_rewrite_the_manifest(path: Path) -> None:
    """What someone who hands over a checkpoint can do: the manifest is a checksum, not a signature."""
    plant_pickle(path)
    manifest_file = path.parents[1] / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    relative = path.relative_to(path.parents[1]).as_posix()
    manifest["files"][relative] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


CHECKPOINT_CASES = [
    Case("checkpoint-engine-truncated", in_checkpoint("policy/engine.pt", truncate), "ppo", DATA,
         ("step-000002", "policy/engine.pt", "resume=never")),
    Case("checkpoint-engine-zero-byte", in_checkpoint("critic/engine.pt", lambda p: p.write_bytes(b"")), "ppo",
         DATA, ("step-000002", "critic/engine.pt", "resume=never")),
    Case("checkpoint-trainer-state-zero-byte", in_checkpoint("trainer-rank0.json", lambda p: p.write_bytes(b"")),
         "ppo", DATA, ("step-000002", "trainer-rank0.json", "resume=never")),
    Case("checkpoint-policy-folder-missing", in_checkpoint("policy", remove), "ppo", DATA,
         ("step-000002", "policy", "resume=never")),
    Case("checkpoint-planted-pickle", in_checkpoint("policy/engine.pt", plant_pickle), "ppo", DATA,
         ("step-000002", "policy/engine.pt", "resume=never")),
    Case("checkpoint-planted-pickle-matching-manifest",
         in_checkpoint("policy/engine.pt", plant_pickle_and_rewrite_the_manifest), "ppo", DATA,
         ("step-000002", "policy", "resume=never")),
    Case("checkpoint-old-format", in_checkpoint("manifest.json", remove), "ppo", DATA,
         ("step-000002", "resume=never")),
    Case("checkpoint-manifest-garbage", in_checkpoint("manifest.json", lambda p: p.write_text("{not json")), "ppo",
         DATA, ("step-000002", "manifest.json", "resume=never")),
]  # fmt: skip

CASES = [*CONFIG_CASES, *PATH_CASES, *DATA_CASES, *MODEL_CASES, *CHECKPOINT_CASES]


def test_the_corpus_covers_every_stage_and_its_ids_are_unique():
    from rlhf_core.stages import STAGES

    assert {c.command for c in CASES} >= set(STAGES), "every stage's bad inputs are in the corpus"
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_named_without_traceback_and_changes_nothing(case: Case, project: Path):
    overrides = case.setup(project) or []
    before = tree_digest(project)
    args = [case.command, "--params", "params.yaml", *(a for o in overrides for a in ("--set", o))]
    result = run_cli(args)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{output[-2000:]}"
    )
    assert "Traceback" not in output, output[-3000:]
    assert result.exit_code == case.status, output[-2000:]
    message = " ".join(output.split())  # rich wraps long lines
    for word in case.words:
        assert word in message, f"{word!r} not in: {message[-1500:]}"
    assert tree_digest(project) == before, "the command changed the project tree"
    assert not list(project.rglob("PWNED")), "a planted pickle ran"


@pytest.mark.parametrize("stage, folder", [("ppo", "outputs/ppo/checkpoints"), ("sft", "outputs/sft")])
def test_a_read_only_output_folder_stops_the_stage_before_it_trains_or_deletes(project, monkeypatch, stage, folder):
    """A read-only ``outputs/ppo`` used to lose its checkpoints to a fresh run before the PermissionError; a
    read-only ``outputs/sft`` failed only after training. Root ignores permission bits, so as root the check's
    view of the folder is made read-only instead of the folder itself."""
    assert (project / "outputs" / "ppo" / "checkpoints" / "step-000002" / "manifest.json").is_file()
    read_only = (project / folder).resolve()
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(
            "rlhf_core.preflight.os.access", lambda p, mode: Path(p).resolve() != read_only and real_access(p, mode)
        )
    else:
        read_only.chmod(0o555)
    before = tree_digest(project)
    try:
        result = run_cli([stage, "--params", "params.yaml"])
    finally:
        read_only.chmod(0o755)
    assert result.exit_code == CONFIG and "Traceback" not in result.output, result.output[-2000:]
    assert "is not writable; nothing was changed" in " ".join(result.output.split())
    assert tree_digest(project) == before

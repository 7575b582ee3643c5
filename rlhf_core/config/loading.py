"""Reading a params file and ``--set`` overrides into a :class:`Config`, turning any problem into one
:class:`ConfigError` line naming the key, the bad value and what is allowed; keys of older releases name their new
place; the resolved configuration written back and described key by key (``rlhf config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_core.config.schema import Config
from rlhf_core.errors import ConfigError


def describe_config(config: BaseModel, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as --set takes it, description) for every leaf of ``config``; ``ppo.tricks.*`` left
    null show the preset's value they resolve to."""
    rows: list[tuple[str, str, str]] = []
    for name, field in type(config).model_fields.items():
        value, key = getattr(config, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += describe_config(value, f"{key}.")
            continue
        shown = _as_set_value(value)
        rows.append((key, shown, field.description or ""))
    if isinstance(config, Config):
        resolved = config.ppo.resolved_tricks()
        rows = [_with_preset_value(row, resolved, config.ppo.preset) for row in rows]
    return rows


def _as_set_value(value: Any) -> str:
    """``value`` as YAML writes it, so the printed value is what ``--set key=value`` takes."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _with_preset_value(row: tuple[str, str, str], resolved: BaseModel, preset: str) -> tuple[str, str, str]:
    key, shown, description = row
    name = (
        key.removeprefix("ppo.tricks.")
        if key.startswith("ppo.tricks.")
        else "kl_coef"
        if key == "ppo.kl_coef"
        else None
    )
    if shown != "null" or name is None or not hasattr(resolved, name):
        return row
    value = getattr(resolved, name)
    return key, f"null ({preset}: {str(value).lower() if isinstance(value, bool) else value})", description


# ----------------------------------------------------------------------------------------------- loading
def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(keys[: depth + 1])}' is a value, not a group")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'sft.lr=3e-4'`` -> ``('sft.lr', 0.0003)``; the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected group.key=value, e.g. --set sft.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"--set {text!r}: the key must name a group and a field, e.g. sft.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for key in path:
        field = model.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


# Keys of earlier releases and where they live now: an old params file gets told where each one went.
_BOTH_OPTIMIZERS = "ppo.policy_optim.{0} and ppo.critic_optim.{0}"
MOVED_KEYS: dict[str, str] = {
    "ppo.policy_lr": "ppo.policy_optim.lr",
    "ppo.critic_lr": "ppo.critic_optim.lr",
    "ppo.warmup_steps": _BOTH_OPTIMIZERS.format("warmup_ratio") + " (a fraction of the optimizer steps)",
    **{f"ppo.{k}": _BOTH_OPTIMIZERS.format(k) for k in (
        "lr_schedule", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm")},
    **{f"{group}.{k}": f"{group}.sampling.{k}" for group in ("ppo", "eval")
       for k in ("temperature", "top_p", "repetition_penalty")},
    **{f"ppo.{k}": f"ppo.monitor.{k}" for k in (
        "collapse_kl", "collapse_length_ratio", "collapse_ppl_ratio", "stop_on_collapse", "max_bad_steps",
        "sample_every")},
    "ppo.checkpoint_every": "ppo.checkpoint.every",
    "ppo.resume": "ppo.checkpoint.resume",
}  # fmt: skip


def _format_validation_error(err: ValidationError, tree: dict, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            if key in MOVED_KEYS:
                lines.append(f"{source}: '{key}' has moved: set {MOVED_KEYS[key]} instead")
                continue
            allowed = ", ".join(_allowed_keys(Config, loc[:-1]))
            lines.append(f"{source}: unknown key '{key}'; allowed here: {allowed}")
            continue
        bad = item.get("input")
        msg = item["msg"].removeprefix("Value error, ")
        if isinstance(bad, dict):
            lines.append(f"{source}: {key}: {msg}")
        else:
            lines.append(f"{source}: {key} = {bad!r}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the last
    one, so a second ``sft:`` group would silently replace the first with its few keys (and defaults)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: key '{key}' is given twice "
                    f"(first on line {seen[key] + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> dict:
    """The params file as a tree of groups, or one ConfigError line naming the file, the line and the problem."""
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params FILE)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        loader = _UniqueKeyLoader(text)  # the reader checks every character here (NUL and the like)
        loader.name = str(path)
        try:
            tree = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if tree is None:
        raise ConfigError(f"{path}: the params file is empty; write the groups to change, or copy params.yaml")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of groups at the top level")
    return tree


def load_config(params_file: str | Path | None = "params.yaml", overrides: list[str] | tuple = ()) -> Config:
    """Read ``params_file`` (None: the built-in defaults), apply ``group.key=value`` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if params_file is not None:
        tree = read_params_file(Path(params_file))
        source = str(params_file)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"--set {text}")
    if overrides:
        source = f"{source} + --set"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, tree, source)) from None


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    from rlhf_core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'sft': {'lr': 1}}`` -> ``{'sft.lr': 1}`` (for MLflow params and comparisons)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat

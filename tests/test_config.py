"""Configuration: params.yaml mirrors the defaults; overrides are typed; bad keys and values fail clearly."""

from __future__ import annotations

import pytest
import yaml

from rlhf_core.config import Config, SFTConfig, flatten, load_config, parse_override, save_config, steps_for
from rlhf_core.errors import ConfigError
from tests.conftest import REPO


def test_params_yaml_is_exactly_the_defaults():
    assert load_config(REPO / "params.yaml") == Config()


def test_params_yaml_groups_are_the_documented_ones():
    groups = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert groups == list(Config.model_fields)
    assert groups == ["data", "model", "sft", "rm", "rm_eval", "ppo", "eval", "distributed", "tracking", "paths"]


def test_every_field_has_a_description():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    walk(Config)


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("sft.lr=3.0e-4") == ("sft.lr", 3e-4)
    assert parse_override("tracking.experiment=1e3") == ("tracking.experiment", "1e3")  # strings stay strings
    assert parse_override("tracking.enabled=false") == ("tracking.enabled", False)
    assert parse_override("model.name_or_path=null") == ("model.name_or_path", None)
    config = load_config(None, ["sft.lr=3e-4", "data.sim.flaws.rambling=2", "distributed.engine=deepspeed"])
    assert config.sft.lr == 3e-4
    assert config.data.sim.flaws.rambling == 2.0
    assert config.distributed.engine == "deepspeed"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.lr=-1", ["sft.lr", "-1", "greater than 0"]),
        ("distributed.zero_stage=4", ["distributed.zero_stage", "4", "less than or equal to 3"]),
        ("distributed.engine=fsdp", ["distributed.engine", "'fsdp'", "'torch' or 'deepspeed'"]),
        ("data.on_bad_rows=ignore", ["data.on_bad_rows", "'error' or 'skip'"]),
        ("sft.bogus=1", ["unknown key 'sft.bogus'", "allowed here", "micro_batch_size"]),
        ("nogroup.x=1", ["unknown key 'nogroup'", "sft"]),
        ("model.num_heads=3", ["model.hidden_size=128", "model.num_heads=3"]),
        ("data.source=hh_rlhf", ["data.path"]),
        ("sft.epochs=abc", ["sft.epochs", "'abc'", "number"]),
        ("data.sim.flaw_prob=0", ["data.sim", "flawed responses"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected group.key=value"):
        load_config(None, ["sft.lr"])
    with pytest.raises(ConfigError, match="must name a group and a field"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    config = Config()
    with pytest.raises(ValueError):
        config.sft.lr = 1.0  # type: ignore[misc]


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["sft.lr=1e-4", "data.splits.eval=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_flatten_gives_dotted_keys():
    flat = flatten(Config().model_dump(mode="json"))
    assert flat["sft.lr"] == Config().sft.lr
    assert flat["data.sim.categories.harmful"] == 0.2


def test_steps_for_exact_batches_and_clear_error():
    optim = SFTConfig(micro_batch_size=4, gradient_accumulation_steps=2, epochs=2)
    assert steps_for(64, optim, world_size=1) == (8, 16)
    assert steps_for(64, optim, world_size=2) == (16, 8)
    with pytest.raises(ConfigError, match="split has 5 examples but one optimizer step needs a global batch of 8"):
        steps_for(5, optim, world_size=1)


def test_presets_set_the_switches_and_explicit_params_win():
    from rlhf_core.config import PRESETS, load_config

    vanilla = load_config(None, ["ppo.preset=vanilla"]).ppo.resolved_tricks()
    assert vanilla["policy_loss_clip"] is True
    assert not any(
        v for k, v in vanilla.items() if k not in ("policy_loss_clip", "kl_estimator", "kl_controller", "kl_coef")
    )
    moss = load_config(None, ["ppo.preset=moss_released"]).ppo.resolved_tricks()
    assert moss["reward_scaling"] and moss["value_loss_clip"] and moss["kl_coef"] == 0.01
    assert not moss["reward_norm"] and not moss["critic_warmup"] and not moss["ptx"]
    default = Config().ppo.resolved_tricks()
    assert default == PRESETS["ppo_max"] and default["kl_coef"] == 0.05
    custom = load_config(None, ["ppo.tricks.ptx=false", "ppo.kl_coef=0.1", "ppo.tricks.kl_estimator=k3"]).ppo
    resolved = custom.resolved_tricks()
    assert resolved == {**PRESETS["ppo_max"], "ptx": False, "kl_coef": 0.1, "kl_estimator": "k3"}
    assert set(PRESETS["vanilla"]) == set(PRESETS["ppo_max"]) == set(PRESETS["moss_released"])
    assert set(PRESETS["ppo_max"]) - {"kl_coef"} == set(Config().ppo.tricks.model_dump())

"""Configuration: params.yaml mirrors the defaults; overrides are typed; bad keys and values fail clearly."""

from __future__ import annotations

import pytest
import yaml

from rlhf_core.config import Config, SFTConfig, flatten, load_config, parse_override, save_config, steps_for
from rlhf_core.errors import ConfigError
from tests.conftest import REPO


def test_params_yaml_is_exactly_the_defaults():
    assert load_config(REPO / "params.yaml") == Config()


def test_params_yaml_lists_every_key_of_the_schema():
    """The defaults live in the schema; params.yaml, the file users read and edit, shows every one of them (with a
    comment where the paper or its code fixes the value). `make generated` adds a key the file lacks."""
    from rlhf_core import params_file

    assert params_file.render() == (REPO / "params.yaml").read_text(), "params.yaml lacks keys: run make generated"


def test_a_missing_key_or_group_is_added_where_it_belongs_and_nothing_else_moves(tmp_path):
    from rlhf_core import params_file

    text = (REPO / "params.yaml").read_text()
    cut = text.replace("  ptx_coef: 0.5", "#  ptx_coef (removed)", 1)
    start = cut.index("\ntracking:")
    cut = cut[:start] + cut[cut.index("\npaths:") :]  # the whole tracking group
    repaired = params_file.render(cut)
    added = [line for line in repaired.splitlines() if line not in cut.splitlines()]
    assert added[0].startswith("  ptx_coef: 0.5  # ") and added[1] == "tracking:  # MLflow tracking."
    assert [line.split(":")[0].strip() for line in added[2:]] == list(type(Config().tracking).model_fields)
    assert all(line in repaired.splitlines() for line in cut.splitlines()), "every existing line is kept"
    path = tmp_path / "params.yaml"
    path.write_text(repaired)
    assert load_config(path) == Config()
    assert params_file.render(repaired) == repaired


def test_params_yaml_groups_are_the_documented_ones():
    groups = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert groups == list(Config.model_fields)
    assert groups == [
        "data",
        "model",
        "sft",
        "rm",
        "rm_eval",
        "ppo",
        "eval",
        "generation",
        "distributed",
        "tracking",
        "paths",
    ]


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
    from rlhf_core.config import PRESETS, TrickOverrides, Tricks, load_config

    vanilla = load_config(None, ["ppo.preset=vanilla"]).ppo.resolved_tricks()
    assert isinstance(vanilla, Tricks) and vanilla.policy_loss_clip is True
    assert not any(
        v for k, v in vanilla.model_dump().items()
        if k not in ("policy_loss_clip", "kl_estimator", "kl_controller", "kl_coef", "advantage_estimator")
    )  # fmt: skip
    assert vanilla.advantage_estimator == "gae" and vanilla.uses_critic
    moss = load_config(None, ["ppo.preset=moss_released"]).ppo.resolved_tricks()
    assert moss.reward_scaling and moss.value_loss_clip and moss.kl_coef == 0.01
    assert not moss.reward_norm and not moss.critic_warmup and not moss.ptx
    default = Config().ppo.resolved_tricks()
    assert default == PRESETS["ppo_max"] and default.kl_coef == 0.05
    for estimator in ("grpo", "rloo", "reinforce_pp"):  # PPO-max's policy side, no critic, no minibatch whitening
        free = load_config(None, [f"ppo.preset={estimator}", "ppo.samples_per_prompt=2"]).ppo.resolved_tricks()
        assert free.advantage_estimator == estimator and not free.uses_critic
        critic_side = {"advantage_norm", "value_loss_clip", "critic_from_rm", "critic_warmup", "advantage_estimator"}
        assert free.model_dump(exclude=critic_side) == default.model_dump(exclude=critic_side)
        assert not (free.advantage_norm or free.value_loss_clip or free.critic_from_rm or free.critic_warmup)
    custom = load_config(None, ["ppo.tricks.ptx=false", "ppo.kl_coef=0.1", "ppo.tricks.kl_estimator=k3"]).ppo
    resolved = custom.resolved_tricks()
    assert resolved == PRESETS["ppo_max"].model_copy(update={"ptx": False, "kl_coef": 0.1, "kl_estimator": "k3"})
    # ppo.tricks.* overrides every switch but the coefficient, which lives at ppo.kl_coef.
    assert set(TrickOverrides.model_fields) == set(Tricks.model_fields) - {"kl_coef"}
    with pytest.raises(Exception, match="frozen"):
        resolved.ptx = True


def test_old_flat_ppo_keys_name_their_new_place():
    from rlhf_core.config import MOVED_KEYS, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["ppo.policy_lr=1e-4", "ppo.temperature=0.7", "eval.top_p=0.5", "ppo.checkpoint_every=5"])
    lines = str(info.value).splitlines()
    assert "'ppo.policy_lr' has moved: set ppo.policy_optim.lr instead" in lines[0]
    assert any("'ppo.temperature' has moved: set ppo.sampling.temperature instead" in line for line in lines)
    assert any("'eval.top_p' has moved: set eval.sampling.top_p instead" in line for line in lines)
    assert any("set ppo.checkpoint.every instead" in line for line in lines)
    defaults = Config().model_dump()
    for new in MOVED_KEYS.values():  # every place an error points to is a real key
        for target in new.split(" (")[0].split(" and "):
            node = defaults
            for part in target.split("."):
                node = node[part]


def test_ppo_sizes_are_derived_once_by_exact_division():
    from rlhf_core.config import load_config, ppo_sizes

    ppo = load_config(None, ["ppo.rollout_size=64", "ppo.minibatch_size=32", "ppo.micro_batch_size=8"]).ppo
    sizes = ppo_sizes(ppo, world_size=2)
    assert (sizes.local_rollout, sizes.minibatches, sizes.local_minibatch, sizes.accumulation) == (32, 2, 16, 2)
    assert sizes.updates_per_iteration == 2 and sizes.warmup_iterations == 5
    assert (sizes.policy_updates, sizes.critic_updates) == ((150 - 5) * 2, 150 * 2)
    with pytest.raises(ConfigError, match="split evenly over 8 process"):
        ppo_sizes(ppo, world_size=8)  # 32 / 8 = 4 per process is not a multiple of 8
    with pytest.raises(ConfigError, match="multiple of ppo.minibatch_size=24"):
        load_config(None, ["ppo.minibatch_size=24"])  # caught when the file is read, before any stage runs
    with pytest.raises(ConfigError, match="leaves no policy update"):
        load_config(None, ["ppo.steps=5"])  # ppo_max warms the critic up for 5 iterations
    assert load_config(None, ["ppo.steps=5", "ppo.tricks.critic_warmup=false"]).ppo.steps == 5


def test_answers_per_prompt_and_the_critic_free_presets_are_checked_before_any_stage_runs():
    from rlhf_core.config import load_config, ppo_sizes

    grpo = load_config(None, ["ppo.preset=grpo", "ppo.samples_per_prompt=4", "ppo.micro_batch_size=8"]).ppo
    sizes = ppo_sizes(grpo, world_size=2)  # 64 rows = 16 prompts x 4 answers, 8 prompts per process
    assert (sizes.local_rollout, sizes.warmup_iterations, sizes.critic_updates) == (32, 0, 0)
    assert sizes.policy_updates == 150 * 2
    with pytest.raises(ConfigError, match="must divide each process's share"):
        ppo = load_config(None, ["ppo.samples_per_prompt=8", "ppo.micro_batch_size=2"]).ppo
        ppo_sizes(ppo, world_size=16)  # 4 rows per process
    with pytest.raises(ConfigError, match="set ppo.samples_per_prompt to 2 or more"):
        load_config(None, ["ppo.preset=rloo"])
    with pytest.raises(ConfigError, match="ppo.tricks.value_loss_clip needs a critic"):
        load_config(None, ["ppo.preset=reinforce_pp", "ppo.tricks.value_loss_clip=true"])
    # One answer per prompt is any preset's default; a group of answers works with the critic too.
    assert ppo_sizes(load_config(None, ["ppo.samples_per_prompt=4"]).ppo, world_size=1).critic_updates == 300

"""Validated configuration: frozen pydantic models mirroring the groups of ``params.yaml`` one to one.

- ``schema``: every group and field with its default, range and description (the one place defaults live);
- ``tricks``: the PPO-max switches, the ``ppo.tricks`` overrides and the presets;
- ``sizes``: what is derived from the settings (PPO's per-process sizes, a stage's optimizer steps);
- ``loading``: ``load_config`` (params file + ``--set`` overrides, every problem one ``ConfigError`` line), the
  table of moved keys, saving and describing a configuration.

Whether the output directories can be written where the run starts (they are relative to the working directory)
is the disk's question, answered before a stage works (``rlhf_core.preflight``), not the schema's.
"""

from rlhf_core.config.base import _Group
from rlhf_core.config.loading import (
    MOVED_KEYS,
    config_to_dict,
    describe_config,
    flatten,
    load_config,
    parse_override,
    read_params_file,
    save_config,
)
from rlhf_core.config.schema import (
    CategoryWeights,
    CheckpointConfig,
    Config,
    CriticOptimizerConfig,
    DataColumns,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    FlawWeights,
    GenerationEngineConfig,
    LoraConfig,
    ModelConfig,
    MonitorConfig,
    OptimizerConfig,
    PathsConfig,
    PolicyOptimizerConfig,
    PPOConfig,
    RMConfig,
    RMEvalConfig,
    SamplingConfig,
    SFTConfig,
    SimConfig,
    SplitSizes,
    SupervisedStageConfig,
    TrackingConfig,
)
from rlhf_core.config.sizes import PPOSizes, ppo_sizes, steps_for
from rlhf_core.config.tricks import PRESETS, TrickOverrides, Tricks
from rlhf_core.errors import ConfigError

__all__ = [
    "MOVED_KEYS", "PRESETS", "CategoryWeights", "CheckpointConfig", "Config", "ConfigError", "CriticOptimizerConfig",
    "DataColumns",
    "DataConfig", "DistributedConfig", "EvalConfig", "FlawWeights", "GenerationEngineConfig", "LoraConfig",
    "ModelConfig", "MonitorConfig", "OptimizerConfig", "PPOConfig", "PPOSizes", "PathsConfig",
    "PolicyOptimizerConfig", "RMConfig", "RMEvalConfig", "SFTConfig", "SamplingConfig", "SimConfig", "SplitSizes",
    "SupervisedStageConfig", "TrackingConfig", "TrickOverrides", "Tricks", "_Group", "config_to_dict",
    "describe_config", "flatten", "load_config", "parse_override", "ppo_sizes", "read_params_file", "save_config",
    "steps_for",
]  # fmt: skip

"""jaxtrain's configuration: typed schema, YAML loading with ``--set`` overrides and Foundry
``${variables.name}`` interpolation, LLM Foundry compatibility, validation, time strings."""

from jaxtrain.config.loader import config_to_dict, dump_yaml, load_config, load_config_dict
from jaxtrain.config.schema import (
    AlgorithmsConfig,
    AttnConfig,
    Config,
    ConfigError,
    DatasetConfig,
    FFNConfig,
    GradientClippingConfig,
    InitConfig,
    LoaderConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    SchedulerConfig,
    TokenizerConfig,
    describe,
)
from jaxtrain.config.timestr import Time, parse_time, to_batches
from jaxtrain.config.validate import data_parallel_size, validate_for_devices

__all__ = [
    "AlgorithmsConfig", "AttnConfig", "Config", "ConfigError", "DatasetConfig", "FFNConfig",
    "GradientClippingConfig", "InitConfig", "LoaderConfig", "ModelConfig", "OptimizerConfig",
    "ParallelismConfig", "SchedulerConfig", "TokenizerConfig", "Time", "config_to_dict", "load_config_dict",
    "data_parallel_size", "describe", "dump_yaml", "load_config", "parse_time", "to_batches",
    "validate_for_devices",
]

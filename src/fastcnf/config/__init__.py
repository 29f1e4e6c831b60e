"""Configuration as data: the schema of a run and its loader (recipes, YAML, overrides).

This package imports nothing from the rest of fastcnf; every other layer reads its settings here.
"""
from fastcnf.config.errors import ConfigError, check_choice, check_tolerance, did_you_mean
from fastcnf.config.loader import (
    RECIPE_DIR,
    DeprecatedOption,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    list_recipes,
    load_recipe,
    load_run_config,
    recipe_dict,
    valid_keys,
)
from fastcnf.config.reflow import ReflowConfig
from fastcnf.config.schema import (
    Config,
    ConditioningConfig,
    DataConfig,
    DistributedConfig,
    EndTimeConfig,
    EvalConfig,
    FlowMatchingConfig,
    LatentODEConfig,
    ModelConfig,
    PartsConfig,
    SolverConfig,
    TolerancesConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "DeprecatedOption", "check_choice", "check_tolerance", "did_you_mean",
    "RECIPE_DIR", "apply_overrides", "config_from_dict", "config_to_dict", "list_recipes", "load_recipe",
    "load_run_config", "recipe_dict", "valid_keys",
    "Config", "ConditioningConfig", "DataConfig", "DistributedConfig", "EndTimeConfig", "EvalConfig",
    "FlowMatchingConfig", "LatentODEConfig", "ModelConfig", "PartsConfig", "SolverConfig",
    "TolerancesConfig", "TrainConfig", "ReflowConfig",
]

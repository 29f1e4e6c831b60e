"""Configuration as data: the core schema of a run and its loader (recipes, YAML, overrides).

This package imports nothing from the rest of fastcnf; every other layer reads its settings here.
The methods' sections live in their own packages; :mod:`fastcnf.methods` extends :class:`Config`
with them and holds the loader every command uses (``fastcnf.methods.load_recipe``).
"""
from fastcnf.config.errors import ConfigError, check_choice, check_tolerance, did_you_mean
from fastcnf.config.loader import (
    RECIPE_DIR,
    ConfigLoader,
    DeprecatedOption,
    apply_overrides,
    config_to_dict,
    list_recipes,
    recipe_dict,
    valid_keys,
)
from fastcnf.config.schema import (
    Config,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    GlowConfig,
    LatentODEConfig,
    ModelConfig,
    SolverConfig,
    TrainConfig,
    UNetConfig,
    extend_config,
)
from fastcnf.config.section import Section

__all__ = [
    "ConfigError", "DeprecatedOption", "check_choice", "check_tolerance", "did_you_mean",
    "RECIPE_DIR", "ConfigLoader", "apply_overrides", "config_to_dict", "list_recipes", "recipe_dict", "valid_keys",
    "Config", "DataConfig", "DistributedConfig", "EvalConfig", "GlowConfig", "LatentODEConfig", "ModelConfig",
    "SolverConfig", "TrainConfig", "UNetConfig", "Section", "extend_config",
]

"""The one table of fastcnf's methods, and what is built from it: the run's configuration class and
loader, the model builder and the training hooks of a configuration.

Each method lives in its own package and exposes one :class:`~fastcnf.method.Method`; this module
is the only place that lists them (and, with the recipes, the only place outside a method's
package that names a method). Adding a method: write its package (``config.py`` with its section,
its model side, ``hook.py``, and ``__init__.py`` with the :class:`~fastcnf.method.Method` object),
add it to :data:`METHODS`, give it a recipe and a docs page.
"""
from __future__ import annotations

from typing import Any, Callable

from fastcnf.conditioning import CONDITIONING
from fastcnf.config import ConfigError, ConfigLoader, check_choice, extend_config
from fastcnf.data.base import DataBundle
from fastcnf.endtime import END_TIME
from fastcnf.flow_matching import FLOW_MATCHING
from fastcnf.method import Hook, Method
from fastcnf.models.builder import build_model as _build_model
from fastcnf.models.flow_model import FlowModel
from fastcnf.models.objectives import Likelihood
from fastcnf.parts import PARTS
from fastcnf.reflow import REFLOW
from fastcnf.tolerances import TOLERANCES

__all__ = ["METHODS", "OBJECTIVES", "Config", "LOADER", "load_recipe", "load_run_config", "config_from_dict",
           "valid_keys", "build_model", "build_hooks", "ConfigError"]

#: every method, in the order the trainer calls their hooks and the builder asks them
#: (reflow first: its hook supplies each step's batch before the others see it)
METHODS: tuple[Method, ...] = (REFLOW, CONDITIONING, END_TIME, TOLERANCES, PARTS, FLOW_MATCHING)

#: ``train.objective`` -> ``(cfg, bundle) -> objective(model, ctx)``: maximum likelihood and the methods' own
OBJECTIVES: dict[str, Callable[[Any, DataBundle], Callable]] = {
    "likelihood": Likelihood, **{k: v for m in METHODS for k, v in m.objectives.items()}}


def _check(cfg: Any) -> None:
    check_choice("train.objective", cfg.train.objective, OBJECTIVES)
    for m in METHODS:
        m.check(cfg)


#: the configuration of a run: the core sections and one section per method (``cfg.<method name>``)
Config = extend_config({m.name: m.section for m in METHODS}, _check)
Config.__module__ = __name__

#: the loader of :class:`Config` (recipes, YAML, ``--set``, deprecated spellings of every method)
LOADER = ConfigLoader(Config, [d for m in METHODS for d in m.deprecations],
                      {k for m in METHODS for k in m.deprecated_keys})


def load_recipe(name: str, overrides: list[str] | None = None) -> Config:
    """The recipe ``name`` with ``KEY=VALUE`` overrides applied, validated.

    Example:
        >>> cfg = load_recipe("toy-toflow", ["train.iterations=10"])
        >>> cfg.endtime.policy, cfg.train.iterations
        ('toflow', 10)
    """
    return LOADER.load_recipe(name, overrides)


def load_run_config(run_dir, overrides: list[str] | None = None) -> Config:
    """The configuration of an existing run directory (its ``config.yaml``) with overrides."""
    return LOADER.load_run_config(run_dir, overrides)


def config_from_dict(values: dict) -> Config:
    """Build and validate a configuration from a nested mapping (old spellings rewritten)."""
    return LOADER.config_from_dict(values)


def valid_keys() -> list[str]:
    """Every dotted key of :class:`Config`."""
    return LOADER.valid_keys()


def build_model(cfg: Config, bundle: DataBundle) -> FlowModel:
    """The :class:`~fastcnf.models.flow_model.FlowModel` of ``cfg`` for the data set ``bundle``,
    with every method's model side (:func:`fastcnf.models.builder.build_model`)."""
    return _build_model(cfg, bundle, METHODS)


def build_hooks(cfg: Config) -> list[Hook]:
    """The training hooks of the methods ``cfg`` turns on, in :data:`METHODS` order."""
    return [h for h in (m.hook(cfg) for m in METHODS) if h is not None]

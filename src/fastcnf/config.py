"""Configuration as data: dataclasses mapped from recipe YAML, dotted overrides, strict keys.

A run is fully described by a :class:`Config`. Recipes (``src/fastcnf/recipes/*.yaml``) give
values for some fields; ``--set a.b=value`` overrides them (values parsed as YAML scalars/lists).
Unknown keys are rejected with the closest valid key and the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastcnf.data.registry import DataConfig
from fastcnf.ode.solve import SolverConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "RECIPE_DIR",
    "list_recipes",
    "load_recipe",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A bad configuration: unknown key, malformed value, unknown recipe."""


@dataclass
class ModelConfig:
    """The model.

    Attributes:
        arch: ``mlp`` (CNF blocks on vectors), ``multiscale`` (FFJORD image architecture) or ``glow``.
        hidden_dims: hidden widths of each dynamics network (FFJORD toy: 64-64-64; images: 64-64-64).
        activation: tanh, softplus, relu, elu or swish (toy: tanh; images: softplus).
        num_blocks: ``mlp``: stacked CNF blocks; ``multiscale``: blocks before and after each squeeze.
        n_scales: multiscale scales (0: FFJORD's automatic choice).
        divergence: ``exact`` or ``hutchinson``.
        exact_mode: exact trace implementation: auto (network forward-mode trace when available), loop, vmap.
        noise: Hutchinson noise: gaussian or rademacher.
        end_time: T0 of every block (FFJORD toy 0.5, images 1.0).
        train_end_time: train T jointly with the network (plain gradient; TO-FLOW is an end-time policy).
        logit_alpha: alpha of the logit transform at the input of image models.
        kinetic_weight: weight of the RNODE kinetic-energy regulariser (0: off).
        jacobian_weight: weight of the RNODE Jacobian-Frobenius regulariser (0: off).
    """

    arch: str = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    activation: str = "tanh"
    num_blocks: int = 1
    n_scales: int = 0
    divergence: str = "exact"
    exact_mode: str = "auto"
    noise: str = "gaussian"
    end_time: float = 0.5
    train_end_time: bool = False
    logit_alpha: float = 1e-6
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0


@dataclass
class TrainConfig:
    """The optimisation.

    Attributes:
        iterations: optimiser steps.
        batch_size: examples per step.
        lr: learning rate (before scaling and schedules).
        weight_decay: L2 weight decay (Adam) or decoupled (AdamW).
        optimizer: adam or adamw.
        schedule: constant, step (decay by ``decay_factor`` at each of ``decay_at``) or cosine.
        warmup_iterations: linear warm-up from 0 over this many iterations (0: none).
        decay_at: iterations (or epochs, see ``decay_unit``) at which the step schedule decays.
        decay_unit: iterations or epochs.
        decay_factor: multiplicative decay of the step schedule.
        min_lr: floor of the cosine schedule.
        grad_clip: clip the gradient norm to this value (0: off).
        eval_every: evaluate on the test split every this many iterations (0: only at the end).
        checkpoint_every: write a checkpoint every this many iterations (0: only at the end).
        log_every: refresh the progress bar / log line every this many iterations.
    """

    iterations: int = 1000
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_iterations: int = 0
    decay_at: list[int] = field(default_factory=list)
    decay_unit: str = "iterations"
    decay_factor: float = 0.1
    min_lr: float = 0.0
    grad_clip: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 200
    log_every: int = 10


@dataclass
class EvalConfig:
    """Evaluation on the test split.

    Attributes:
        atol, rtol: solver tolerances at evaluation (002 §4.2: 1e-5).
        batch_size: evaluation batch size.
        max_examples: evaluate on at most this many test examples (0: all).
        n_samples: samples drawn for the figures.
        seed: seed of evaluation noise (dequantisation, Hutchinson), so evaluations are repeatable.
    """

    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 1000
    max_examples: int = 0
    n_samples: int = 64
    seed: int = 1234


# ---- feature sections: each is owned by its feature module (see the docstrings) -------------

@dataclass
class ConditioningConfig:
    """Class conditioning (CCNF / InfoCNF, 002 §2; implemented in fastcnf.priors and
    fastcnf.training.conditioning).

    Attributes:
        kind: none, ccnf or infocnf.
    """

    kind: str = "none"


@dataclass
class TolerancesConfig:
    """Solver-tolerance policy (002 §3; fastcnf.ode.tolerances).

    Attributes:
        policy: fixed (solver.atol/rtol for every block).
    """

    policy: str = "fixed"


@dataclass
class EndTimeConfig:
    """End-time policy (TO-FLOW 004, STEER; fastcnf.cnf.endtime and fastcnf.training.endtime).

    Attributes:
        policy: fixed (model.end_time; model.train_end_time trains it by plain gradient).
    """

    policy: str = "fixed"


@dataclass
class PartsConfig:
    """Training a flow by gradient-isolated parts (003; fastcnf.training.parts).

    Attributes:
        enabled: train by parts.
    """

    enabled: bool = False


@dataclass
class DistributedConfig:
    """Data-parallel training under torchrun (fastcnf.training.distributed).

    Attributes:
        backend: auto (nccl on GPU, gloo on CPU), gloo or nccl.
    """

    backend: str = "auto"


@dataclass
class Config:
    """A whole run.

    Attributes:
        recipe: the recipe this configuration came from.
        description: one line shown by ``fastcnf recipes``.
        seed: seed of initialisation, data order and noise.
        device: cpu, cuda, cuda:N.
        dtype: float32 or float64.
        threads: torch threads on CPU (0: torch's default).
        task: density (flows) or another registered task (fastcnf.training.tasks.TASKS).
    """

    recipe: str = ""
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    task: str = "density"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    tolerances: TolerancesConfig = field(default_factory=TolerancesConfig)
    endtime: EndTimeConfig = field(default_factory=EndTimeConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------

def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_error(key: str, cls, prefix: str) -> ConfigError:
    valid = _valid_keys(cls, prefix)
    close = difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown configuration key {prefix + key!r}{hint} (valid keys: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"bad value for {key!r}: {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key!r} expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key!r} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key!r} expects a string, got {value!r}")
        return str(value)
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key_error(key, cls, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid {prefix.rstrip('.') or 'configuration'}: {e}") from None


def config_from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> None:
    """Cross-field checks with clear messages."""
    choices = {
        "model.arch": (cfg.model.arch, ("mlp", "multiscale", "glow")),
        "model.divergence": (cfg.model.divergence, ("exact", "hutchinson")),
        "model.noise": (cfg.model.noise, ("gaussian", "rademacher")),
        "model.exact_mode": (cfg.model.exact_mode, ("auto", "loop", "vmap")),
        "train.optimizer": (cfg.train.optimizer, ("adam", "adamw")),
        "train.schedule": (cfg.train.schedule, ("constant", "step", "cosine")),
        "train.decay_unit": (cfg.train.decay_unit, ("iterations", "epochs")),
        "dtype": (cfg.dtype, ("float32", "float64")),
    }
    for key, (value, accepted) in choices.items():
        if value not in accepted:
            close = difflib.get_close_matches(str(value), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not valid{hint}; accepted: {', '.join(accepted)}")
    positive = {
        "train.iterations": cfg.train.iterations, "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr, "model.end_time": cfg.model.end_time, "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    for key in ("atol", "rtol"):
        v = getattr(cfg.eval, key)
        if not 0 < v < 1:
            raise ConfigError(f"eval.{key} must be in (0, 1), got {v!r}")
    if cfg.model.hidden_dims and min(cfg.model.hidden_dims) <= 0:
        raise ConfigError(f"model.hidden_dims must be positive, got {cfg.model.hidden_dims}")


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed value for {key!r}: {text!r}") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` strings (dotted keys) to a nested mapping, validating the keys."""
    valid = set(_valid_keys(Config))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown configuration key {key!r}{hint} (see `fastcnf train RECIPE --show`)")
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text, key)
    return values


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

RECIPE_DIR = Path(str(resources.files("fastcnf") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description."""
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        out[path.stem] = str(data.get("description", "")).strip()
    return out


def recipe_dict(name: str) -> dict:
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.exists():
        names = list(list_recipes())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; available: {', '.join(names)}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    base = data.pop("base", None)
    if base is not None:
        merged = recipe_dict(base)
        _deep_update(merged, data)
        data = merged
    data["recipe"] = name
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_recipe(name: str, overrides: list[str] | None = None) -> Config:
    """The recipe ``name`` with ``KEY=VALUE`` overrides applied, validated."""
    values = recipe_dict(name)
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> Config:
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)

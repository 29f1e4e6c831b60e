"""Loading a configuration: recipes, YAML, ``KEY=VALUE`` overrides, strict keys, deprecations.

A run is fully described by a :class:`~fastcnf.config.schema.Config`. Recipes
(``src/fastcnf/recipes/*.yaml``) give values for some fields; ``--set a.b=value`` overrides them
(values parsed as YAML). Unknown keys are rejected with the closest valid key; an option that was
renamed still loads, with a one-line :class:`DeprecatedOption` warning.
"""
from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from fastcnf.config.errors import ConfigError, did_you_mean
from fastcnf.config.schema import Config

__all__ = [
    "DeprecatedOption",
    "RECIPE_DIR",
    "list_recipes",
    "recipe_dict",
    "config_to_dict",
    "apply_overrides",
    "valid_keys",
    "ConfigLoader",
    "DEPRECATIONS",
    "DEPRECATED_KEYS",
]


class DeprecatedOption(FutureWarning):
    """A renamed or merged option was used; it still loads (the message says the new spelling)."""


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------

def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (default: the core :class:`Config`, without the methods' sections)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_error(key: str, cls, prefix: str) -> ConfigError:
    valid = valid_keys(cls, prefix)
    return ConfigError(f"unknown configuration key {prefix + key!r}{did_you_mean(prefix + key, valid, 0.5)} "
                       f"(valid keys: {', '.join(valid)})")


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
    if origin is typing.Literal:  # the choice itself is checked when the section is built
        return _coerce(value, type(args[0]), key)
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
    except TypeError as e:
        raise ConfigError(f"invalid {prefix.rstrip('.') or 'configuration'}: {e}") from None


_NESTED = {"glow": ("levels", "steps", "hidden", "lu", "preprocess"), "unet": ("channels", "levels")}


def _nest_architecture_options(values: dict) -> str | None:
    """``model.glow_levels`` -> ``model.glow.levels`` (and the other architecture options)."""
    model = values.get("model") or {}
    moved = []
    for arch, names in _NESTED.items():
        for name in names:
            old = f"{arch}_{name}"
            if old in model:
                model.setdefault(arch, {})[name] = model.pop(old)
                moved.append(f"model.{old} is now model.{arch}.{name}")
    return "; ".join(moved) + " (old spelling deprecated)" if moved else None


#: the three switches ``solver.gradient`` replaced
_OLD_GRADIENT_KEYS = ("adjoint", "recompute", "fused")


def _merge_gradient_switches(values: dict) -> str | None:
    """``solver.adjoint`` / ``recompute`` / ``fused`` -> ``solver.gradient``: adjoint=true -> adjoint,
    recompute=true -> recompute, fused=false -> direct (no fused solve), otherwise auto."""
    solver = values.get("solver") or {}
    old = {k: solver.pop(k) for k in _OLD_GRADIENT_KEYS if k in solver}
    if not old:
        return None
    if old.get("adjoint") and old.get("recompute"):
        raise ConfigError("solver.recompute=true recomputes direct back-propagation: it conflicts with "
                          "solver.adjoint=true; use solver.gradient=recompute or solver.gradient=adjoint")
    gradient = ("adjoint" if old.get("adjoint") else "recompute" if old.get("recompute")
                else "direct" if old.get("fused") is False else "auto")
    solver["gradient"] = gradient  # an old switch set explicitly (e.g. --set) overrides a recipe's gradient
    spelled = " ".join(f"solver.{k}={str(v).lower()}" for k, v in old.items())
    return f"{spelled} is deprecated: it became solver.gradient={gradient}"


#: keys that no longer exist but still load through a rewrite below (accepted by ``--set``)
DEPRECATED_KEYS = {f"model.{arch}_{name}" for arch, names in _NESTED.items() for name in names} | {
    f"solver.{k}" for k in _OLD_GRADIENT_KEYS}

#: rewrites of old spellings, each ``values -> message | None`` (applied before the keys are checked)
DEPRECATIONS: list[Callable[[dict], str | None]] = [_nest_architecture_options, _merge_gradient_switches]


def _copy(values: Any) -> Any:
    return {k: _copy(v) for k, v in values.items()} if isinstance(values, dict) else values


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed value for {key!r}: {text!r}") from None


def apply_overrides(values: dict, overrides: list[str], valid: set[str]) -> dict:
    """Apply ``KEY=VALUE`` strings (dotted keys, each in ``valid``) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise ConfigError(f"unknown configuration key {key!r}{did_you_mean(key, sorted(valid), 0.5)} "
                              "(see `fastcnf train RECIPE --show`)")
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
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, names)}; available: {', '.join(names)}")
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


class ConfigLoader:
    """Reads configurations of one schema: the core :class:`Config` extended by the methods'
    sections (:mod:`fastcnf.methods` builds the one loader every command uses).

    Args:
        schema: the configuration dataclass.
        deprecations: rewrites of old spellings, each ``values -> message | None``, applied before
            the keys are checked (each message becomes a :class:`DeprecatedOption` warning).
        deprecated_keys: old dotted keys ``--set`` still accepts (a rewrite moves them).
    """

    def __init__(self, schema: type, deprecations: list[Callable[[dict], str | None]] = (),
                 deprecated_keys: set[str] = frozenset()) -> None:
        self.schema = schema
        self.deprecations = list(DEPRECATIONS) + list(deprecations)
        self.deprecated_keys = set(DEPRECATED_KEYS) | set(deprecated_keys)

    def valid_keys(self) -> list[str]:
        """Every dotted key of the schema."""
        return valid_keys(self.schema)

    def config_from_dict(self, values: dict):
        """Build and validate a configuration from a nested mapping (old spellings are rewritten,
        with a :class:`DeprecatedOption` warning each)."""
        values = _copy(values)
        for rewrite in self.deprecations:
            message = rewrite(values)
            if message:
                warnings.warn(message, DeprecatedOption, stacklevel=3)
        return _build(self.schema, values, "")

    def apply_overrides(self, values: dict, overrides: list[str]) -> dict:
        """Apply ``KEY=VALUE`` strings (dotted keys of the schema or deprecated ones)."""
        return apply_overrides(values, overrides, set(self.valid_keys()) | self.deprecated_keys)

    def load_recipe(self, name: str, overrides: list[str] | None = None):
        """The recipe ``name`` with ``KEY=VALUE`` overrides applied, validated."""
        values = recipe_dict(name)
        self.apply_overrides(values, list(overrides or []))
        return self.config_from_dict(values)

    def load_run_config(self, run_dir: str | Path, overrides: list[str] | None = None):
        """The configuration of an existing run directory (its ``config.yaml``) with overrides."""
        path = Path(run_dir) / "config.yaml"
        if not path.exists():
            raise ConfigError(f"{run_dir} is not a fastcnf run directory (no config.yaml)")
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
        self.apply_overrides(values, list(overrides or []))
        return self.config_from_dict(values)

"""The configuration loader (fastcnf.config.loader): recipes, ``KEY=VALUE`` overrides, strict keys,
run directories, and old spellings that load with one :class:`DeprecatedOption` warning and their
new meaning."""
from __future__ import annotations

import warnings

import pytest
import yaml

from fastcnf.config import ConfigError, DeprecatedOption, config_to_dict, list_recipes
from fastcnf.methods import config_from_dict, load_recipe, load_run_config


def _load_warning(load):
    """``(config, [messages of the DeprecatedOption warnings])`` of ``load()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load()
    return cfg, [str(w.message) for w in caught if issubclass(w.category, DeprecatedOption)]


def test_every_recipe_loads_without_a_deprecation_warning():
    for name in list_recipes():
        _, messages = _load_warning(lambda: load_recipe(name))
        assert messages == [], (name, messages)


def test_overrides_set_dotted_keys_with_yaml_values():
    cfg = load_recipe("toy-ffjord", ["train.lr=3e-4", "model.hidden_dims=[8, 8]", "data.name=moons"])
    assert cfg.train.lr == 3e-4 and cfg.model.hidden_dims == [8, 8] and cfg.data.name == "moons"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown configuration key 'train.lrr' \(did you mean 'train.lr'\?\)"),
    ("train.lr", "malformed override 'train.lr': expected KEY=VALUE"),
    ("model.hidden_dims=[8,", "malformed value"),
])
def test_bad_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("toy-ffjord", [override])


def test_unknown_keys_in_a_mapping_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown configuration key 'data.batch' .*valid keys: data.name, data.root"):
        config_from_dict({"data": {"name": "digits", "batch": 3}})


def test_unknown_recipe_is_a_config_error_naming_a_close_one():
    with pytest.raises(ConfigError, match="toy-ffjord"):
        load_recipe("toy-ffjrod")


def test_train_end_time_loads_as_joint_end_time_with_one_warning():
    cfg, messages = _load_warning(lambda: load_recipe("toy-ffjord", ["model.train_end_time=true"]))
    assert cfg.endtime.policy == "joint"
    assert messages == ["model.train_end_time is deprecated: use endtime.policy=joint"]
    off, messages = _load_warning(lambda: load_recipe("toy-ffjord", ["model.train_end_time=false"]))
    assert off.endtime.policy == "fixed" and messages == []
    with pytest.raises(ConfigError, match="conflicts with endtime.policy='toflow'"):
        load_recipe("toy-toflow", ["model.train_end_time=true"])


def test_fixed_policy_tolerances_load_as_solver_tolerances_with_one_warning():
    cfg, messages = _load_warning(lambda: load_recipe(
        "toy-ffjord", ["tolerances.atol=[1e-4]", "tolerances.rtol=1e-3", "tolerances.adjoint_atol=[1e-2]"]))
    assert (cfg.solver.atol, cfg.solver.rtol, cfg.solver.adjoint_atol) == (1e-4, 1e-3, 1e-2)
    assert cfg.tolerances.atol == [] and cfg.tolerances.policy == "fixed"
    assert len(messages) == 1 and "deprecated: use solver.atol/rtol/adjoint_atol" in messages[0]
    with pytest.raises(ConfigError, match="use tolerances.policy=per_block"):
        load_recipe("toy-ffjord", ["tolerances.atol=[1e-3, 1e-5]"])


def test_run_directory_config_with_an_old_spelling_loads_with_overrides(tmp_path):
    values = config_to_dict(load_recipe("toy-ffjord"))
    values["model"]["train_end_time"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    cfg, messages = _load_warning(lambda: load_run_config(tmp_path, ["train.iterations=7"]))
    assert cfg.endtime.policy == "joint" and cfg.train.iterations == 7 and len(messages) == 1
    with pytest.raises(ConfigError, match="not a fastcnf run directory"):
        load_run_config(tmp_path / "missing")


def test_config_round_trips_through_a_dict():
    cfg = load_recipe("digits-infocnf", ["train.iterations=3"])
    assert config_from_dict(config_to_dict(cfg)) == cfg

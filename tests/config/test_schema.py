"""The configuration schema (fastcnf.config.schema): every choice and range is checked when a section
is built, always with the one :class:`ConfigError`, naming the key and the accepted values."""
from __future__ import annotations

import pytest

from fastcnf.config import ConfigError, DataConfig, SolverConfig, check_choice, check_tolerance
from fastcnf.methods import load_recipe
from fastcnf.config.schema import SOLVER_METHODS


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_solver_method_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"solver.method='rk45' is not valid .*accepted: dopri5, bosh3, .*rk4, euler"):
        SolverConfig(method="rk45")
    for method in SOLVER_METHODS:
        assert SolverConfig(method=method).method == method


def test_unknown_solver_backend_lists_the_accepted_ones():
    assert SolverConfig().backend == "fastcnf"
    with pytest.raises(ConfigError, match="solver.backend='scipy' is not valid; accepted: fastcnf, torchdiffeq"):
        SolverConfig(backend="scipy")


@pytest.mark.parametrize("field", ["atol", "rtol", "adjoint_atol", "adjoint_rtol"])
@pytest.mark.parametrize("value", [0.0, -1e-5, 1.0, 3.0, float("nan")])
def test_solver_tolerance_outside_the_unit_interval_is_rejected(field, value):
    with pytest.raises(ConfigError, match=rf"solver.{field} must be in \(0, 1\)"):
        SolverConfig(**{field: value})


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0, float("nan"), "abc"])
def test_check_tolerance_accepts_only_the_open_unit_interval(bad):
    assert check_tolerance(1e-5, "atol") == 1e-5
    with pytest.raises(ConfigError, match=r"atol must be .*\(0, 1\)"):
        check_tolerance(bad, "atol")


def test_check_choice_suggests_the_closest_choice():
    with pytest.raises(ConfigError, match=r"endtime.policy='tofow' is not valid \(did you mean 'toflow'\?\); "
                                          "accepted: fixed, joint, toflow, steer"):
        check_choice("endtime.policy", "tofow", ["fixed", "joint", "toflow", "steer"])
    check_choice("tolerances.policy", "learned", ["fixed", "per_block", "learned"])


def test_bad_tolerance_settings_are_config_errors_with_the_accepted_values():
    with pytest.raises(ConfigError, match=r"tolerances.atol\[1\] must be in \(0, 1\)"):
        load_recipe("toy-ffjord", ["tolerances.policy=per_block", "tolerances.atol=[1e-3, 1.5]"])
    with pytest.raises(ConfigError, match="accepted: fixed, per_block, learned"):
        load_recipe("toy-ffjord", ["tolerances.policy=lerned"])
    with pytest.raises(ConfigError, match="max_tol"):
        load_recipe("toy-ffjord", ["tolerances.max_tol=0"])


def test_per_block_tolerances_without_atol_are_a_config_error_at_load():
    with pytest.raises(ConfigError, match="tolerances.policy=per_block needs tolerances.atol"):
        load_recipe("toy-ffjord", ["tolerances.policy=per_block"])


def test_bad_conditioning_config_is_rejected_with_accepted_values():
    with pytest.raises(ConfigError, match="accepted: none, ccnf, infocnf"):
        load_recipe("toy-ffjord", ["conditioning.kind=info"])
    with pytest.raises(ConfigError, match="uniform, empirical"):
        load_recipe("toy-ffjord", ["conditioning.kind=ccnf", "conditioning.label_prior=flat"])


def test_unknown_regularizer_reduction_is_a_config_error():
    with pytest.raises(ConfigError, match="model.regularizer_reduction='avg' is not valid"):
        load_recipe("toy-rnode", ["model.regularizer_reduction=avg"])


@pytest.mark.parametrize("override, words", [
    ("model.end_time=0", "model.end_time must be positive"),
    ("model.end_time=-1", "model.end_time must be positive"),
    ("endtime.policy=tofow", "did you mean 'toflow'"),
    ("endtime.clip_eps=0", "endtime.clip_eps must be positive"),
    ("endtime.clip_eps=0.5", "must be below T0"),
    ("endtime.steer_b=-0.1", "endtime.steer_b must be positive"),
    ("endtime.lr=0", "endtime.lr must be positive"),
])
def test_bad_end_time_configuration_is_a_config_error(override, words):
    with pytest.raises(ConfigError, match=words):
        load_recipe("toy-toflow", [override])


@pytest.mark.parametrize("override, message", [
    ("parts.level_boundaries=[2, 1.5]", "strictly increasing"),
    ("parts.mechanism=greedy", "accepted: alternate, sequential"),
    ("parts.unit=steps", "accepted: iterations, epochs"),
    ("parts.lr_scales=[1, -1]", "positive"),
    ("parts.turn=0", "turn must be >= 1"),
])
def test_invalid_parts_configuration_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("digits-glow-parts", [override])


def test_data_sizes_are_checked_when_the_section_is_built():
    assert DataConfig(name="digits", n_train=10).n_train == 10
    with pytest.raises(ConfigError, match="data.n_train"):
        DataConfig(name="moons", n_train=-1)
    with pytest.raises(ConfigError, match="train_fraction"):
        DataConfig(name="mnist-test-split", train_fraction=1.0)


def test_lr_scaling_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_recipe("toy-ffjord", ["train.lr_scaling=cubic"])

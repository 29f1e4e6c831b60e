"""The model builder (fastcnf.models.builder): its static tables cover every configuration choice,
and each choice reaches the model it builds (prior and latent slices, end-time and tolerance
policies, regularisers)."""
from __future__ import annotations

import typing

import pytest
import torch

from fastcnf.cnf.endtime import FixedEndTime
from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime
from fastcnf.tolerances.gates import LearnedTolerance
from fastcnf.config import ConfigError, ModelConfig
from fastcnf.methods import config_from_dict, load_recipe
from fastcnf.data import load_data
from fastcnf.data.base import DataBundle, DataSplit
from fastcnf.models.builder import ARCHITECTURES, REGULARIZERS
from fastcnf.methods import build_model
from fastcnf.priors import ClassConditionalGaussian, StandardNormal
from reference_models import labelled_vectors


def _choices(cls, field: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(cls)[field]))


def _cfg(**sections):
    base = {"model": {"arch": "mlp", "hidden_dims": [8], "num_blocks": 2}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def test_tables_cover_every_configured_choice():
    from fastcnf import endtime, tolerances
    from fastcnf.conditioning.config import ConditioningConfig
    from fastcnf.conditioning.prior import CONDITIONED_SLICES
    from fastcnf.endtime.config import EndTimeConfig
    from fastcnf.tolerances.config import TolerancesConfig

    assert {"mlp", "multiscale", "glow"} <= set(ARCHITECTURES) <= _choices(ModelConfig, "arch")
    assert set(CONDITIONED_SLICES) | {"none"} == _choices(ConditioningConfig, "kind")
    assert set(tolerances.POLICIES) == _choices(TolerancesConfig, "policy")
    assert set(endtime.POLICIES) == _choices(EndTimeConfig, "policy")
    assert {f"{name}_weight" for name in REGULARIZERS} <= {f.name for f in __import__("dataclasses").fields(ModelConfig)}


@pytest.mark.parametrize("kind, prior", [("none", StandardNormal), ("ccnf", ClassConditionalGaussian),
                                         ("infocnf", ClassConditionalGaussian)])
def test_conditioning_kind_picks_the_prior(kind, prior):
    model = build_model(_cfg(conditioning={"kind": kind}), labelled_vectors())
    assert type(model.prior) is prior


@pytest.mark.parametrize("policy, cls, learnable", [("fixed", FixedEndTime, False), ("joint", FixedEndTime, True),
                                                    ("toflow", LearnedEndTime, True),
                                                    ("steer", RandomEndTime, False)])
def test_end_time_policy_reaches_every_block(policy, cls, learnable):
    model = build_model(_cfg(endtime={"policy": policy}, model={"end_time": 0.7}), labelled_vectors())
    for b in model.cnf_blocks():
        assert type(b.end_time_policy) is cls and b.end_time_policy.end_time.requires_grad == learnable
        assert float(b.end_time.detach()) == pytest.approx(0.7)


def test_per_block_policy_sets_each_blocks_solver_from_the_config():
    cfg = _cfg(tolerances={"policy": "per_block", "atol": [1e-2, 1e-6], "adjoint_atol": [1e-3]})
    model = build_model(cfg, labelled_vectors())
    blocks = model.cnf_blocks()
    assert [b.solver.atol for b in blocks] == [1e-2, 1e-6]
    assert [b.solver.rtol for b in blocks] == [1e-2, 1e-6]
    assert [b.solver.adjoint_atol for b in blocks] == [1e-3, 1e-3]
    assert model.tolerance_policy is None
    with pytest.raises(ConfigError, match="2 CNF blocks"):
        build_model(_cfg(tolerances={"policy": "per_block", "atol": [1e-2, 1e-3, 1e-4]}), labelled_vectors())


def test_learned_policy_is_part_of_the_model_and_chooses_each_blocks_tolerance():
    model = build_model(_cfg(tolerances={"policy": "learned", "init_tol": 1e-3}), labelled_vectors())
    assert isinstance(model.tolerance_policy, LearnedTolerance)
    assert len(model.tolerance_policy.gates) == 2
    assert all(b.tolerance is not None for b in model.cnf_blocks())
    assert any(k.startswith("tolerance_policy.gates.0.") for k in model.state_dict())
    with torch.no_grad():
        model(labelled_vectors().train.x)
    assert sorted(r[0] for r in model.tolerance_policy.records) == [0, 1]


def test_regularizer_weights_build_the_regularizers():
    model = build_model(_cfg(model={"kinetic_weight": 0.5, "jacobian_weight": 0.0}), labelled_vectors())
    regs = [r for b in model.cnf_blocks() for r in b.regularizers]
    assert [(r.name, r.weight) for r in regs] == [("kinetic", 0.5)] * 2


def test_mlp_on_images_and_image_architectures_on_vectors_are_config_errors():
    with pytest.raises(ConfigError, match="needs images"):
        build_model(_cfg(model={"arch": "multiscale"}), labelled_vectors())
    images = load_data(load_recipe("digits-cnf").data, 0)
    with pytest.raises(ConfigError, match="needs vector data"):
        build_model(_cfg(), images)


@pytest.mark.parametrize("recipe,reduction", [("toy-rnode", "sum"), ("digits-cnf", "mean")])
def test_auto_reduction_follows_the_loss_unit(recipe, reduction):
    """model.regularizer_reduction=auto: per-dimension on images (loss in bits/dim), summed on
    vector data (loss in nats per example), so one weight means the same on both."""
    cfg = load_recipe(recipe, ["model.kinetic_weight=0.01", "model.jacobian_weight=0.01"])
    model = build_model(cfg, load_data(cfg.data))
    regs = [r for b in model.cnf_blocks() for r in b.regularizers]
    assert regs and {r.reduction for r in regs} == {reduction}
    forced = load_recipe(recipe, ["model.kinetic_weight=0.01", "model.regularizer_reduction=sum"])
    assert {r.reduction for b in build_model(forced, load_data(forced.data)).cnf_blocks() for r in b.regularizers} \
        == {"sum"}


def test_infocnf_conditions_half_of_the_whole_latent():
    cfg = load_recipe("digits-infocnf")
    bundle = DataBundle(name="digits", train=DataSplit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4)),
                        test=DataSplit(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.arange(2)),
                        shape=(1, 8, 8), num_classes=10, levels=17, split="fake")
    model = build_model(cfg, bundle)
    flow = ARCHITECTURES[cfg.model.arch](cfg, bundle, ())
    assert (model.prior.cond_start, model.prior.cond_size) == (0, flow.latent_dim // 2)  # z = [z_y, z_u]
    last = build_model(load_recipe("digits-infocnf", ["conditioning.placement=last"]), bundle)
    assert (last.prior.cond_start, last.prior.cond_size) == (flow.latent_dim // 2, flow.latent_dim // 2)
    # the layout before issue 17, kept for old runs: half of the final latent piece
    final = flow.latent_sizes[-1]
    old = build_model(load_recipe("digits-infocnf", ["conditioning.placement=final_piece"]), bundle)
    assert (old.prior.cond_start, old.prior.cond_size) == (flow.latent_dim - final, final // 2)
    ccnf = build_model(load_recipe("digits-ccnf"), bundle)
    assert (ccnf.prior.cond_start, ccnf.prior.cond_size) == (0, flow.latent_dim)


def test_conditioning_needs_labels():
    b = labelled_vectors()
    unlabelled = DataBundle(name="fake", train=DataSplit(b.train.x), test=DataSplit(b.test.x), shape=b.shape,
                            num_classes=None, levels=None, split="fake")
    with pytest.raises(ValueError, match="needs a labelled data set"):
        build_model(_cfg(conditioning={"kind": "infocnf"}), unlabelled)


@pytest.mark.parametrize("dim,widths", [(2, [8, 12]), (4, [12, 12]), (6, [18, 18])])
def test_min_width_per_dim_widens_only_the_layers_below_k_times_the_dimension(dim, widths):
    cfg = _cfg(model={"hidden_dims": [8, 12], "num_blocks": 1, "min_width_per_dim": 3})
    net = build_model(cfg, labelled_vectors(dim=dim)).cnf_blocks()[0].net
    assert [tuple(layer.layer.weight.shape) for layer in net.layers] == \
        [(widths[0], dim), (widths[1], widths[0]), (dim, widths[1])]

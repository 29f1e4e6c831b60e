"""Glow as SequentialFlow steps: invertibility, exact log-determinants, actnorm init, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcnf.flows.glow import (
    ActNorm,
    AffineCoupling,
    GlowSplit,
    GlowStep,
    InvConv1x1,
    Shift,
    build_glow,
    initialize_actnorm,
)
from fastcnf.flows.layers import Squeeze
from fastcnf.models.flow_model import FlowModel
from fastcnf.priors import standard_normal_logprob

DT = torch.float64


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter off its initial value, so zero-initialised convolutions (coupling,
    split prior) are not trivially zero in the checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of ``fn`` at each example of ``x``, from the full Jacobian (float64)."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(1, *xi.shape)).reshape(-1), xi.reshape(-1))
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        out.append(logabs)
    return torch.stack(out)


def ready(module: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """float64, actnorms initialised on a batch, parameters perturbed, eval mode."""
    torch.manual_seed(seed)
    module = module.double()
    initialize_actnorm(module, torch.randn(16, *shape, dtype=DT) * 1.5 + 0.3)
    return perturb(module, seed=seed).eval()


def step_cases():
    return {
        "actnorm": (lambda: ActNorm(2), (2, 2, 2)),
        "invconv_plain": (lambda: InvConv1x1(4, lu=False), (4, 2, 2)),
        "invconv_lu": (lambda: InvConv1x1(4, lu=True), (4, 2, 2)),
        "coupling": (lambda: AffineCoupling(4, hidden=8), (4, 2, 2)),
        "coupling_odd_channels": (lambda: AffineCoupling(3, hidden=8), (3, 2, 2)),
        "glow_step": (lambda: GlowStep(4, hidden=8), (4, 2, 2)),
        "shift": (lambda: Shift(-0.5), (2, 2, 2)),
    }


@pytest.mark.parametrize("name", list(step_cases()))
def test_step_inverse_round_trip(name):
    make, shape = step_cases()[name]
    step = ready(make(), shape)
    x = torch.randn(5, *shape, dtype=DT)
    y, _ = step(x)
    assert torch.allclose(step.inverse(y), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(step_cases()))
def test_step_logdet_equals_brute_force_jacobian(name):
    make, shape = step_cases()[name]
    step = ready(make(), shape)
    x = torch.randn(3, *shape, dtype=DT)
    _, logdet = step(x)
    expected = brute_force_logdet(lambda v: step(v)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=1e-8)


def split_as_bijection(split: GlowSplit):
    def fn(x):
        kept, eps, _ = split(x)
        return torch.cat([kept.reshape(x.shape[0], -1), eps.reshape(x.shape[0], -1)], dim=1)
    return fn


def test_glow_split_round_trip_and_logdet_equals_brute_force_jacobian():
    shape = (4, 2, 2)
    split = ready(GlowSplit(4), shape)
    x = torch.randn(3, *shape, dtype=DT)
    kept, eps, logdet = split(x)
    assert kept.shape == (3, 2, 2, 2) and eps.shape == (3, 2, 2, 2)
    assert torch.allclose(split.inverse(kept, eps), x, atol=1e-10)
    assert torch.allclose(logdet, brute_force_logdet(split_as_bijection(split), x), atol=1e-8, rtol=1e-8)


def test_glow_split_whitening_gives_the_conditional_gaussian_density():
    split = ready(GlowSplit(4), (4, 2, 2))
    x = torch.randn(3, 4, 2, 2, dtype=DT)
    kept, eps, logdet = split(x)
    mean, logs = split.conditional_prior(kept)
    normal = torch.distributions.Normal(mean, torch.exp(logs))
    direct = normal.log_prob(x[:, 2:]).reshape(3, -1).sum(1)
    assert torch.allclose(standard_normal_logprob(eps) + logdet, direct, atol=1e-10)


def test_fresh_coupling_scales_by_sigmoid_two_and_split_is_identity():
    torch.manual_seed(0)
    coupling, split = AffineCoupling(4, hidden=8).double(), GlowSplit(4).double()
    x = torch.randn(6, 4, 4, 4, dtype=DT)
    y, logdet = coupling(x)
    s = torch.sigmoid(torch.tensor(2.0, dtype=DT))
    assert torch.equal(y[:, :2], x[:, :2]) and torch.allclose(y[:, 2:], s * x[:, 2:])
    assert torch.allclose(logdet, torch.full((6,), 2 * 16 * torch.log(s).item(), dtype=DT))
    kept, eps, logdet = split(x)
    assert torch.equal(eps, x[:, 2:]) and torch.equal(logdet, torch.zeros(6, dtype=DT))


# ---- actnorm -----------------------------------------------------------------------------------
def test_actnorm_first_batch_gives_zero_mean_unit_variance_per_channel():
    norm = ActNorm(3).double()
    x = torch.randn(32, 3, 4, 4, dtype=DT) * torch.tensor([0.1, 2.0, 7.0], dtype=DT).view(1, 3, 1, 1) + 5
    y, _ = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DT), atol=1e-10)
    assert torch.allclose(y.var(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=DT), atol=1e-4)


def test_actnorm_is_not_reinitialised_on_the_second_batch_nor_after_loading():
    norm = ActNorm(3).double()
    norm(torch.randn(32, 3, 4, 4, dtype=DT) * 3 + 1)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(torch.randn(32, 3, 4, 4, dtype=DT) * 0.1 - 4)
    assert all(torch.equal(norm.state_dict()[k], v) for k, v in state.items())

    fresh = ActNorm(3).double()
    assert not bool(fresh.initialized)
    fresh.load_state_dict(state)
    assert fresh.training and bool(fresh.initialized)
    fresh(torch.randn(32, 3, 4, 4, dtype=DT) * 0.1 - 4)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_actnorm_loading_an_uninitialised_state_allows_initialisation_again():
    norm = ActNorm(2).double()
    norm(torch.randn(8, 2, 2, 2, dtype=DT))
    norm.load_state_dict(ActNorm(2).double().state_dict())
    x = torch.randn(8, 2, 2, 2, dtype=DT) * 4 + 1
    y, _ = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=DT), atol=1e-10)


def test_actnorm_does_not_initialise_in_eval_mode():
    norm = ActNorm(2).eval()
    x = torch.randn(4, 2, 2, 2)
    y, logdet = norm(x)
    assert not bool(norm.initialized) and torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))


def test_actnorm_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"ActNorm expects input of shape \(batch, 3, H, W\)"):
        ActNorm(3)(torch.randn(2, 1, 4, 4))


def test_initialize_actnorm_counts_layers_and_restores_eval_mode():
    flow = build_glow((1, 4, 4), levels=2, steps=1, hidden=4).eval()
    n = initialize_actnorm(flow, torch.rand(8, 1, 4, 4))
    assert n == 2 * 3  # per GlowStep: its actnorm and the coupling network's two hidden actnorms
    assert not flow.training
    assert initialize_actnorm(flow, torch.rand(8, 1, 4, 4)) == 0


# ---- 1x1 convolution ---------------------------------------------------------------------------
def test_lu_invconv_logdet_equals_slogdet_of_reconstructed_weight():
    conv = perturb(InvConv1x1(6, lu=True).double(), scale=0.3)
    w = conv.weight_matrix()
    sign, logabs = torch.linalg.slogdet(w)
    assert sign != 0 and torch.allclose(conv.log_abs_det(), logabs, atol=1e-12)
    _, logdet = conv(torch.randn(2, 6, 3, 5, dtype=DT))
    assert torch.allclose(logdet, torch.full((2,), 15 * logabs.item(), dtype=DT))


@pytest.mark.parametrize("lu", [False, True])
def test_invconv_starts_as_a_rotation(lu):
    w = InvConv1x1(5, lu=lu).double().weight_matrix().detach()
    assert torch.allclose(w @ w.T, torch.eye(5, dtype=DT), atol=1e-6)


def test_lu_invconv_fixed_parts_are_buffers():
    conv = InvConv1x1(4, lu=True)
    params = {n for n, _ in conv.named_parameters()}
    assert params == {"lower", "upper", "log_s"}
    assert {"perm", "sign_s"} <= set(conv.state_dict())


# ---- the whole flow ----------------------------------------------------------------------------
def tiny_model(preprocess: str = "shift", seed: int = 0) -> FlowModel:
    torch.manual_seed(seed)
    model = FlowModel(build_glow((2, 4, 4), levels=2, steps=1, hidden=6, preprocess=preprocess), levels=256)
    model = model.double()
    initialize_actnorm(model, torch.rand(16, 2, 4, 4, dtype=DT))
    return perturb(model, scale=0.05, seed=seed).eval()


@pytest.mark.parametrize("preprocess", ["shift", "logit"])
def test_glow_round_trip(preprocess):
    model = tiny_model(preprocess)
    x = torch.rand(4, 2, 4, 4, dtype=DT) * 0.98 + 0.01
    z = model.encode(x)
    assert z.shape == (4, 32)
    assert torch.allclose(model.decode(z), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preprocess", ["shift", "logit"])
def test_glow_log_prob_is_normal_log_density_of_encoding_plus_brute_force_logdet(preprocess):
    model = tiny_model(preprocess)
    x = torch.rand(2, 2, 4, 4, dtype=DT) * 0.98 + 0.01
    logdet = brute_force_logdet(model.encode, x)
    expected = standard_normal_logprob(model.encode(x)) + logdet
    assert torch.allclose(model.log_prob(x), expected, atol=1e-7, rtol=1e-9)
    assert torch.allclose(model(x)[1], logdet, atol=1e-7, rtol=1e-9)


def test_glow_flow_model_interface():
    model = tiny_model()
    x = torch.rand(3, 2, 4, 4, dtype=DT)
    bpd = model.bits_per_dim(x)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 2, 4, 4) and samples.dtype == DT
    assert model.cnf_blocks() == [] and model.nfe_record() == {}


def test_glow_layout_and_level_boundaries_partition_the_steps():
    flow = build_glow((1, 8, 8), levels=3, steps=2, hidden=4)
    kinds = [type(s).__name__ for s in flow.steps]
    assert kinds == ["Shift", "Squeeze", "GlowStep", "GlowStep", "GlowSplit",
                     "Squeeze", "GlowStep", "GlowStep", "GlowSplit",
                     "Squeeze", "GlowStep", "GlowStep"]
    assert flow.level_boundaries == [0, 5, 9]
    assert all(isinstance(flow.steps[b], Squeeze) for b in flow.level_boundaries[1:])
    # latent: 2x4x4 factored, then 4x2x2 factored, then the final 16x1x1 output
    assert flow.latent_shapes == [(2, 4, 4), (4, 2, 2), (16, 1, 1)] and flow.latent_dim == 64


def test_running_the_levels_part_by_part_equals_the_whole_flow():
    model = tiny_model()
    flow = model.flow
    x = torch.rand(3, 2, 4, 4, dtype=DT)
    z, logdet = flow(x)
    bounds = flow.level_boundaries + [len(flow.steps)]
    h, total, pieces = x, torch.zeros(3, dtype=DT), []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        h, ld, factored = flow.forward_range(h, start, stop)
        total, pieces = total + ld, pieces + factored
    z_parts = torch.cat([p.reshape(3, -1) for p in pieces] + [h.reshape(3, -1)], dim=1)
    assert torch.allclose(z_parts, z) and torch.allclose(total, logdet)


def test_loaded_glow_reproduces_log_prob_without_reinitialising():
    model = tiny_model()
    x = torch.rand(4, 2, 4, 4, dtype=DT)
    expected = model.log_prob(x)
    torch.manual_seed(123)
    fresh = FlowModel(build_glow((2, 4, 4), levels=2, steps=1, hidden=6), levels=256).double()
    fresh.load_state_dict(model.state_dict())
    fresh.train()  # training mode: an un-initialised actnorm would re-initialise here
    assert torch.allclose(fresh.log_prob(x), expected, atol=1e-12)
    assert torch.allclose(fresh.log_prob(x), expected, atol=1e-12)


def test_glow_trains_one_step_with_finite_gradients():
    torch.manual_seed(0)
    model = FlowModel(build_glow((1, 4, 4), levels=2, steps=2, hidden=8), levels=256)
    loss = model.bits_per_dim(torch.rand(8, 1, 4, 4)).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- configuration errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(1, 6, 6), levels=2, steps=1), r"6x6 image cannot be squeezed 2 times.*2\*\*levels = 4"),
        (dict(shape=(1, 8, 12), levels=3, steps=1), r"divisible by 2\*\*levels = 8"),
        (dict(shape=(1, 8, 8), levels=0, steps=1), r"levels must be an integer >= 1, got 0"),
        (dict(shape=(1, 8, 8), levels=2, steps=0), r"steps must be an integer >= 1, got 0"),
        (dict(shape=(1, 8, 8), levels=2, steps=1, hidden=0), r"hidden must be an integer >= 1"),
        (dict(shape=(1, 8, 8), levels=1.5, steps=1), r"levels must be an integer"),
        (dict(shape=(8, 8), levels=1, steps=1), r"image shape \(C, H, W\)"),
        (dict(shape=(1, 8, 8), levels=1, steps=1, preprocess="dequant"), r"unknown preprocess 'dequant'.*'logit'"),
        (dict(shape=(1, 8, 8), levels=1, steps=1, logit_alpha=0.05), r"logit_alpha applies only to preprocess='logit'"),
        (dict(shape=(1, 8, 8), levels=1, steps=1, preprocess="logit", logit_alpha=0.7), r"logit alpha must be in"),
    ],
)
def test_bad_glow_configuration_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_glow(**kwargs)


def test_bad_layer_configuration_raises_clear_error():
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="at least 2 channels"):
        GlowSplit(1)
    with pytest.raises(ValueError, match="at least one channel"):
        InvConv1x1(0)

"""Hutchinson's estimator by forward mode (``mode="jvp"``) equals the reverse-mode reference
(``mode="vjp"``): the divergence value, and its gradients w.r.t. the input and the parameters,
in float64, for the conv network's fused tangent pass and for the generic forward-AD fallback."""
from __future__ import annotations

import pytest
import torch

from fastcnf.cnf.divergence import Hutchinson, jvp
from fastcnf.cnf.dynamics import ConcatSquashConvNet, ConcatSquashMLP


def _conv_net(channels_last: bool) -> ConcatSquashConvNet:
    torch.manual_seed(0)
    return ConcatSquashConvNet(2, (6, 5), activation="softplus", channels_last=channels_last).double()


def _value_and_grads(est: Hutchinson, net, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    z = z0.clone().requires_grad_(True)
    f, result = est.evaluate(net, t, z, noise, create_graph=True)
    # a scalar of both outputs, as the adjoint's backward solve forms it
    weight = torch.linspace(-1.0, 1.0, f.numel(), dtype=f.dtype).reshape(f.shape)
    loss = (f * weight).sum() + (result.div * torch.arange(1.0, z.shape[0] + 1, dtype=f.dtype)).sum()
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, [z, t, *params], allow_unused=True)
    return f.detach(), result.div.detach(), grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_jvp_hutchinson_equals_vjp_value_and_gradients_conv(channels_last):
    net = _conv_net(channels_last)
    z0 = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    ref = Hutchinson("rademacher", mode="vjp")
    fast = Hutchinson("rademacher", mode="jvp")
    noise = ref.sample_noise(z0)
    f_ref, div_ref, g_ref = _value_and_grads(ref, net, z0, noise, t)
    f_fast, div_fast, g_fast = _value_and_grads(fast, net, z0, noise, t)
    torch.testing.assert_close(f_fast, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(div_fast, div_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_jvp_fallback_forward_ad_equals_vjp_for_a_network_without_tangent_pass():
    torch.manual_seed(1)
    net = ConcatSquashMLP(3, (7, 7), activation="tanh").double()
    z0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 3, dtype=torch.float64)
    assert not hasattr(net, "forward_with_tangent")
    f_ref, div_ref, g_ref = _value_and_grads(Hutchinson("gaussian", mode="vjp"), net, z0, noise, t)
    f_fast, div_fast, g_fast = _value_and_grads(Hutchinson("gaussian", mode="jvp"), net, z0, noise, t)
    torch.testing.assert_close(div_fast, div_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_conv_tangent_pass_is_the_jacobian_vector_product():
    net = _conv_net(True)
    z = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.tensor(0.6, dtype=torch.float64)
    f, jac_v = jvp(net, t, z, v)
    f_ref, jac_v_ref = torch.func.jvp(lambda x: net(t, x), (z,), (v,))
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac_v, jac_v_ref, rtol=1e-10, atol=1e-12)


def test_jvp_called_with_precomputed_f_still_returns_the_same_divergence():
    net = _conv_net(False)
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.1, dtype=torch.float64)
    ref, fast = Hutchinson("rademacher"), Hutchinson("rademacher", mode="jvp")
    noise = ref.sample_noise(z)
    f = net(t, z)
    torch.testing.assert_close(fast(f, z, noise, net, t).div, ref(f, z, noise, net, t).div, rtol=1e-10, atol=1e-12)


def test_unknown_mode_is_rejected_with_the_accepted_ones():
    with pytest.raises(ValueError, match="vjp, jvp"):
        Hutchinson("rademacher", mode="forward")

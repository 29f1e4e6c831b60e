"""The conv dynamics in channels-last layout equal the default (NCHW) layout: output, input
gradient and parameter gradients in float64; the output keeps the input's layout."""
from __future__ import annotations

import torch

from fastcnf.cnf.dynamics import ConcatSquashConvNet


def _pair():
    torch.manual_seed(3)
    nchw = ConcatSquashConvNet(3, (8, 8), activation="softplus", channels_last=False).double()
    fast = ConcatSquashConvNet(3, (8, 8), activation="softplus", channels_last=True).double()
    fast.load_state_dict(nchw.state_dict())
    return nchw, fast


def test_channels_last_equals_nchw_output_and_gradients():
    nchw, fast = _pair()
    z0 = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    results = []
    for net in (nchw, fast):
        z = z0.clone().requires_grad_(True)
        f = net(t, z)
        assert f.is_contiguous()  # the solver's state keeps its layout
        grads = torch.autograd.grad((f * torch.cos(z0)).sum(), [z, *net.parameters()])
        results.append((f.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channels_last_switch_off_keeps_the_reference_forward():
    nchw, _ = _pair()
    assert nchw.channels_last is False
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)
    h = z
    for i, layer in enumerate(nchw.layers):
        h = layer(t, h)
        if i < len(nchw.acts):
            h = nchw.acts[i](h)
    torch.testing.assert_close(nchw(t, z), h, rtol=0, atol=0)

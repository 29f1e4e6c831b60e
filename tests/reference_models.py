"""Independent references shared by several test files: quadrature, reference trajectories,
dynamics with closed-form flows, a small labelled data set."""
from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint

from fastcnf.data.base import DataBundle, DataSplit


def trajectory(net, x: torch.Tensor, end_time: float, n_points: int, dtype=torch.float64):
    """``(ts, zs)``: the solution of ``dz/dt = net(t, z)`` on ``n_points`` equally spaced times,
    by torchdiffeq at tolerance 1e-11 (a reference independent of fastcnf's solvers)."""
    ts = torch.linspace(0.0, end_time, n_points, dtype=dtype)
    with torch.no_grad():
        zs = odeint(net, x, ts, atol=1e-11, rtol=1e-11, method="dopri5")
    return ts, zs


def simpson(values: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Composite Simpson rule over dim 0 (odd number of equally spaced points)."""
    n = values.shape[0]
    assert n % 2 == 1
    h = (ts[-1] - ts[0]) / (n - 1)
    w = torch.ones(n, dtype=values.dtype)
    w[1:-1:2] = 4
    w[2:-1:2] = 2
    return (h / 3) * torch.tensordot(w, values, dims=1)


class ZeroField(nn.Module):
    """f(t, z) = 0: the identity flow, log-det 0."""

    def forward(self, t, z):
        return torch.zeros_like(z)


class LinearField(nn.Module):
    """f(t, z) = A z: z(T) = exp(T A) z(0) and log-det = T tr(A)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z @ self.a.T


def labelled_vectors(dim: int = 4, k: int = 3, n: int = 24) -> DataBundle:
    """A small labelled vector data set (Gaussian points, labels 0..k-1 in turn)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.arange(n) % k
    return DataBundle(name="fake", train=DataSplit(x, y), test=DataSplit(x[:8], y[:8]), shape=(dim,),
                      num_classes=k, levels=None, split="fake")

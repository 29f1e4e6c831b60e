"""The conditional flow-matching loss: regress a CNF's dynamics onto a path's target velocity.

For a data batch ``x``, a noise batch ``eps``, a coupling that pairs them, per-example times
``t ~ q(t)`` and a conditional path (:mod:`fastcnf.flow_matching.paths`)::

    loss = mean over the batch and every coordinate of (f(t_i, x_t,i) - u_t,i)^2

-- the conditional flow-matching objective (Lipman et al. 2023 eq. 9 and 23; Tong et al. 2024,
CFM loss) divided by the dimension, as torchcfm reports it, so learning rates carry over. One
network evaluation per example, no solver and no trace. ``f`` has the signature of a CNF block's
dynamics, ``f(t, z)``, in fastcnf's time convention (data at ``t = 0``, noise at ``t = 1``): the
trained network is the block's ``net`` with ``end_time = 1`` as it stands.

Per-example times: networks that take ``t`` of shape (B,) declare ``per_example_time = True``
(the U-Net and the concat-squash networks) and are called once on the batch. Any other
network taking a scalar ``t`` (e.g. a user's own) is evaluated through
``torch.func.vmap`` over the batch: still one batched evaluation, the same values as calling it
example by example. A network with an operation vmap cannot batch is evaluated example by example
(correct, B calls; a warning names the network once).

References: Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 9, 23; Tong et al.
2024, "Improving and generalizing flow-based generative models with minibatch optimal transport".
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.func import vmap

from fastcnf.flow_matching.pairing import Coupling, IndependentCoupling
from fastcnf.flow_matching.paths import ProbabilityPath, TimeSampler, UniformTime

__all__ = ["velocity_at_times", "flow_matching_loss"]


def velocity_at_times(net: Callable[..., Tensor], t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
    """``net`` evaluated at per-example times: row ``i`` is ``net(t[i], x[i:i+1] (, cond[i:i+1]))``.

    Args:
        net: dynamics ``net(t, x)`` (``net(t, x, cond)`` when ``cond`` is given).
        t: times, a scalar or shape (B,).
        x: batch (B, ...).
        cond: optional per-example conditioning (B, ...) passed as the third argument (e.g. labels).
    """
    args = () if cond is None else (cond,)
    if t.dim() == 0 or getattr(net, "per_example_time", False):
        return net(t, x, *args)
    if t.shape != x.shape[:1]:
        raise ValueError(f"time must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")

    def one(ti: Tensor, xi: Tensor, *ci: Tensor) -> Tensor:
        return net(ti, xi.unsqueeze(0), *(c.unsqueeze(0) for c in ci)).squeeze(0)

    try:
        return vmap(one, randomness="different")(t, x, *args)
    except (RuntimeError, NotImplementedError) as err:  # an operation without a batching rule
        # the same message from the same line is shown once (Python's default warning filter)
        warnings.warn(f"{type(net).__name__} takes a scalar time and cannot be vmapped "
                      f"({str(err).splitlines()[0]}); evaluating it example by example (B calls). Give it "
                      "per-example times and per_example_time = True to make this one call.",
                      RuntimeWarning, stacklevel=2)
        return torch.stack([one(t[i], x[i], *(c[i] for c in args)) for i in range(x.shape[0])])


def flow_matching_loss(
    net: Callable[..., Tensor],
    x_data: Tensor,
    noise: Tensor,
    path: ProbabilityPath,
    coupling: Coupling | None = None,
    time_sampler: TimeSampler | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """The conditional flow-matching loss of ``net`` on one batch (a scalar tensor).

    Args:
        net: dynamics ``net(t, z)`` (or ``net(t, z, cond)``) in fastcnf's convention.
        x_data: data batch (B, D) or (B, C, H, W).
        noise: source batch of the same shape (standard normal, or drawn per class by the caller
            from a class-conditional source, ``noise[i]`` belonging to class ``labels[i]``).
        path: the conditional probability path (:class:`~fastcnf.flow_matching.paths.IndependentCFMPath`,
            :class:`~fastcnf.flow_matching.paths.LipmanOTPath`).
        coupling: pairs noise with data (default independent; exact or Sinkhorn OT for OT-CFM).
        time_sampler: draws ``t`` in [0, 1] per example (default uniform).
        generator: random source for the times, the path's extra noise and Sinkhorn's draws.
        labels: classes of the examples; the coupling then pairs only within each class.
        cond: conditioning passed to the network as its third argument (e.g. the labels).

    Example:
        >>> from fastcnf.cnf import ConcatSquashMLP
        >>> from fastcnf.flow_matching.paths import IndependentCFMPath
        >>> net = ConcatSquashMLP(2, (64, 64))
        >>> x = torch.randn(128, 2) * 0.5 + 2
        >>> loss = flow_matching_loss(net, x, torch.randn_like(x), IndependentCFMPath())
        >>> loss.backward()
    """
    b = x_data.shape[0]
    if noise.shape != x_data.shape:
        raise ValueError(f"data {tuple(x_data.shape)} and noise {tuple(noise.shape)} differ in shape")
    coupling = coupling if coupling is not None else IndependentCoupling()
    time_sampler = time_sampler if time_sampler is not None else UniformTime()
    index = coupling(x_data, noise, labels=labels, generator=generator)
    noise = noise[index]
    t = time_sampler(b, dtype=x_data.dtype, device=x_data.device, generator=generator)
    x_t, u_t = path.sample(x_data, noise, t, generator=generator)
    v = velocity_at_times(net, t, x_t, cond)
    return (v - u_t).pow(2).mean()

"""The model a user holds: a flow, a prior, and the data's geometry.

``log p(x | y) = log p(z | y) + logdet`` with ``(z, logdet) = flow(x)`` (change of variables;
Grathwohl et al. 2019, "FFJORD", eq. 1-4). Images are modelled in dequantised [0, 1) space;
bits/dim converts to the discrete data (FFJORD; Du et al. 2022, "TO-FLOW", eq. 18)::

    bits/dim = -( log p(x) / D - log(levels) ) / log 2

with ``levels`` = 256 for 8-bit images and 17 for scikit-learn's digits.
"""
from __future__ import annotations

import itertools
import math
import numbers

import torch
from torch import Tensor, nn

from fastcnf.flows.sequential import SequentialFlow
from fastcnf.ode.fixed_step import fixed_steps
from fastcnf.priors import Prior, StandardNormal

__all__ = ["InputError", "FlowModel", "bits_per_dim_from_log_prob"]


class InputError(ValueError):
    """Bad input at the model's boundary (shape, dtype, NaN/inf, label)."""


def bits_per_dim_from_log_prob(log_prob: Tensor, dim: int, levels: int) -> Tensor:
    """FFJORD / TO-FLOW eq. 18: bits per dimension of the discrete data from log p of the
    dequantised data in [0, 1)^D."""
    return -(log_prob / dim - math.log(levels)) / math.log(2.0)


class FlowModel(nn.Module):
    """A normalizing flow with a prior.

    Args:
        flow: the invertible map from data to the flat latent.
        prior: the latent's distribution (standard normal by default; CCNF / InfoCNF priors plug in).
        levels: quantisation levels of image data (None for continuous data: no bits/dim).

    Example:
        >>> from fastcnf.cnf import CNFBlock, ConcatSquashMLP
        >>> from fastcnf.flows import SequentialFlow
        >>> model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2))], input_shape=(2,)))
        >>> model.log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
    """

    def __init__(self, flow: SequentialFlow, prior: Prior | None = None, levels: int | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.data_shape: tuple[int, ...] = flow.input_shape
        self.dim = math.prod(self.data_shape)
        self.prior = prior if prior is not None else StandardNormal(flow.latent_dim, flow.latent_sizes)
        self.levels = levels
        #: the tolerance policy's trainable part (learned gates) when it has one, else None
        self.tolerance_policy: nn.Module | None = None

    # ---- boundary checks -------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype | None]:
        """Device and dtype of the model's first floating-point tensor; ``(cpu, None)`` for a flow
        without any (e.g. a bare logit transform), which accepts every floating dtype."""
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
        return torch.device("cpu"), None

    def _check_tensor(self, x: Tensor, what: str, shape: tuple[int, ...]) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"expected the {what} as a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            hint = " (dequantise integer images first: fastcnf.data.dequantize)" if what == "input" else ""
            raise InputError(f"expected a floating-point {what}, got dtype {x.dtype}{hint}")
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise InputError(f"expected {what} of shape (batch, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")
        dtype = self._device_dtype()[1]
        if dtype is not None and x.dtype != dtype:
            raise InputError(f"expected {what} of dtype {dtype} (the model's), got {x.dtype}: "
                             f"convert it with .to({dtype}) or the model with .to({x.dtype})")
        if not torch.isfinite(x).all():
            raise InputError(f"{what} contains NaN or inf")

    def check_input(self, x: Tensor) -> None:
        self._check_tensor(x, "input", self.data_shape)

    def check_label(self, y: Tensor | None, batch: int) -> Tensor | None:
        if y is None:
            return None
        if not getattr(self.prior, "conditional", False):
            return None
        n = self.prior.num_classes
        y = torch.as_tensor(y, device=self._device_dtype()[0])
        if y.dim() == 0:
            y = y.expand(batch)
        if y.dtype.is_floating_point or y.shape != (batch,):
            raise InputError(f"labels must be integers of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
        if (y < 0).any() or (y >= n).any():
            bad = y[(y < 0) | (y >= n)][0].item()
            raise InputError(f"unknown label {bad}: labels must be in 0..{n - 1}")
        return y.long()

    # ---- the interface ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Data -> flat latent z."""
        self.check_input(x)
        return self.flow(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Flat latent z -> data."""
        self._check_tensor(z, "latent", (self.flow.latent_dim,))
        return self.flow.inverse(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``; the trainer uses this to share one solve between losses."""
        self.check_input(x)
        return self.flow(x)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) (or log p(x | y) for a conditional prior) per example, in nats."""
        z, logdet = self(x)
        y = self.check_label(y, x.shape[0])
        return self.prior.log_prob(z, y) + logdet

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Bits per dimension of the discrete data (images only; see the module docstring)."""
        if self.levels is None:
            raise InputError("bits/dim is defined for image data only (levels is None)")
        return bits_per_dim_from_log_prob(self.log_prob(x, y), self.dim, self.levels)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None,
               steps: int | None = None, method: str = "euler") -> Tensor:
        """Draw ``n`` samples (class-conditional when ``y`` is given and the prior is conditional).

        ``steps``: solve every CNF block with that many fixed steps of ``method`` (``euler``,
        ``midpoint``, ``heun``, ``rk4``; :func:`fastcnf.ode.fixed_step.fixed_steps`) instead of its
        own (adaptive) solver; :meth:`nfe_last` then holds the evaluations spent.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise InputError(f"number of samples must be a positive int, got {n!r}")
        device, dtype = self._device_dtype()
        y = self.check_label(y, n)
        z = self.prior.sample(n, y, generator=generator, device=device, dtype=dtype or torch.get_default_dtype())
        if steps is None:
            return self.decode(z)
        with fixed_steps(self, method, steps):
            return self.decode(z)

    # ---- NFE record ------------------------------------------------------------------------
    def cnf_blocks(self) -> list[nn.Module]:
        return self.flow.cnf_blocks()

    def nfe_record(self) -> dict[str, dict[str, int]]:
        """NFE of the last solve of each block: ``{block: {"forward": n, "backward": m}}``."""
        return {b.name: b.nfe.record() for b in self.cnf_blocks()}

    def nfe_last(self) -> tuple[int, int]:
        """Total forward and backward NFE of the last pass over all blocks."""
        rec = self.nfe_record().values()
        return sum(r["forward"] for r in rec), sum(r["backward"] for r in rec)

    def nfe_mean(self) -> dict[str, dict[str, float]]:
        """Running mean NFE per block since the last :meth:`reset_nfe`."""
        return {b.name: {"forward": b.nfe.mean_forward, "backward": b.nfe.mean_backward} for b in self.cnf_blocks()}

    def reset_nfe(self) -> None:
        for b in self.cnf_blocks():
            b.nfe.reset()

    def end_times(self) -> dict[str, float]:
        return {b.name: float(b.end_time.detach()) for b in self.cnf_blocks()}

    def regularization_states(self) -> dict[str, Tensor]:
        """Per-example regulariser integrals of the last forward, summed over blocks."""
        out: dict[str, Tensor] = {}
        for b in self.cnf_blocks():
            for k, v in b.reg_states.items():
                out[k] = out[k] + v if k in out else v
        return out

    def regularization_loss(self) -> Tensor | float:
        """``sum_blocks sum_r weight_r * mean(integral_r)`` (Finlay et al. 2020, "How to train your neural ODE")."""
        total: Tensor | float = 0.0
        for b in self.cnf_blocks():
            for r in b.regularizers:
                if r.name in b.reg_states and r.weight > 0:
                    total = total + r.weight * b.reg_states[r.name].mean()
        return total

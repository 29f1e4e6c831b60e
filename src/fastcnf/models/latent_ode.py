"""LatentODE (Rubanova et al. 2019; Chen et al. 2018 §5) and InfoCNF's partitioned latent.

Generative model: ``z_t0 ~ p(z_t0)``, ``z_ti = ODESolve(f, z_t0, t0, ti)``,
``x_ti ~ N(decoder(z_ti), sigma^2 I)``. Inference: an RNN reads the observations *backwards in
time* (last to first) so that its final state summarises the whole sequence at ``t0``, and outputs
the mean and log-variance of ``q(z_t0 | x_t0..x_tN)``. Training maximises the ELBO

    ELBO = E_q[ sum_i log N(x_ti; decoder(z_ti), sigma^2 I) ] - KL(q(z_t0 | x) || p(z_t0))

with one reparameterised sample (Chen et al. 2018 eq. 11-12; Kingma & Welling 2014).

Partitioned latent (InfoCNF, Nguyen et al. 2019, §4.6, Appendix E.2): ``z_t0 = [z_y, z_u]`` with
``z_y`` the first ``supervised_dim`` (3) coordinates. The prior of ``z_y`` is conditioned on the label
``y = (a, b, direction)`` through a *linear* map ``q_phi(y) -> (mean, log-variance)`` (InfoCNF's
class-conditional Gaussian, InfoCNF eq. 2 ``p(z_y | y)``), ``z_u`` keeps ``N(0, I)``, and a *linear*
head ``q_theta(z_y)`` predicts ``y`` (InfoCNF's supervised loss, eq. 3). The head sees
``z_y`` only.

Sizes of InfoCNF Appendix E.2: RNN encoder with 25 hidden units, 5-D latent, dynamics and decoder
MLPs with one hidden layer of 20 units. The ODE is solved through :func:`fastcnf.ode.solve.solve`
at every observation time at once (dense output), with the NFE recorded.

Example:
    >>> import torch
    >>> model = LatentODE(supervised_dim=3)
    >>> x = torch.randn(4, 10, 2); t = torch.linspace(0, 1, 10)
    >>> out = model(x, t, labels=torch.zeros(4, 3))
    >>> out["x_mean"].shape, out["kl"].shape
    (torch.Size([4, 10, 2]), torch.Size([4]))

References: Rubanova et al. 2019 (Latent ODEs for irregularly-sampled time series); Chen et al.
2018 (neural ODEs) §5 and eqs. 11-12; Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous
Normalizing Flow Using Adaptive Solvers", §4.6, App. E.2. Full entries: docs/bibliography.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.ode.solve import NFECounter, SolverConfig, solve

__all__ = [
    "RecognitionRNN",
    "LatentDynamics",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "check_sequence",
    "LatentODE",
]


def gaussian_kl(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor) -> Tensor:
    """``KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p)))`` summed over the last dimension.

    Closed form per coordinate: ``0.5 (logvar_p - logvar_q + (var_q + (mean_q - mean_p)^2) / var_p - 1)``.
    """
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1.0)
    return kl.sum(-1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """``sum log N(x; mean, std^2)`` over every dimension but the first (one value per sequence)."""
    ll = -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    return ll.flatten(1).sum(1)


def check_sequence(x: Tensor, times: Tensor, obs_dim: int) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(batch, len(times), obs_dim)`` and ``times`` is a 1-D
    strictly increasing tensor (all sequences share the time grid, so they must have equal length)."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != obs_dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"observations must be a (batch, time, {obs_dim}) tensor of equal-length "
                         f"sequences, got {shape}")
    if not isinstance(times, Tensor) or times.dim() != 1:
        raise ValueError("times must be a 1-D tensor of observation times shared by the batch")
    if times.shape[0] != x.shape[1]:
        raise ValueError(f"sequence length {x.shape[1]} does not match the {times.shape[0]} time stamps")
    if times.shape[0] < 2:
        raise ValueError("a sequence needs at least 2 time stamps")
    if not bool((times[1:] > times[:-1]).all()):
        bad = int(torch.nonzero(times[1:] <= times[:-1])[0]) + 1
        raise ValueError(f"time stamps must be strictly increasing; times[{bad}]={float(times[bad]):.6g} "
                         f"<= times[{bad - 1}]={float(times[bad - 1]):.6g}")


class RecognitionRNN(nn.Module):
    """Fully connected (Elman) RNN reading a sequence from its last observation to its first.

    ``h <- tanh(W [x_ti, h] + c)`` for ``i = N..0``; then ``(mean, logvar) = V h + d``.
    """

    def __init__(self, obs_dim: int = 2, hidden: int = 25, latent_dim: int = 5) -> None:
        super().__init__()
        self.hidden = hidden
        self.i2h = nn.Linear(obs_dim + hidden, hidden)
        self.h2o = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: ``(batch, time, obs_dim)`` in time order; returns ``(mean, logvar)`` of ``q(z_t0|x)``."""
        h = x.new_zeros(x.shape[0], self.hidden)
        for i in range(x.shape[1] - 1, -1, -1):  # time-reversed: z_t0 sees the whole future
            h = torch.tanh(self.i2h(torch.cat([x[:, i], h], dim=-1)))
        mean, logvar = self.h2o(h).chunk(2, dim=-1)
        return mean, logvar


class LatentDynamics(nn.Module):
    """Time-invariant latent vector field ``f(z)``: one hidden layer (ELU)."""

    def __init__(self, latent_dim: int = 5, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, latent_dim))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class LatentODE(nn.Module):
    """LatentODE with an optional partitioned latent (see the module docstring).

    Args:
        obs_dim: observation dimension (2 for spirals).
        latent_dim: dimension of ``z_t0`` (InfoCNF: 5).
        rnn_hidden: hidden units of the recognition RNN (InfoCNF: 25).
        dynamics_hidden: hidden units of the dynamics MLP (InfoCNF: 20).
        decoder_hidden: hidden units of the decoder MLP (InfoCNF: 20).
        supervised_dim: size of ``z_y`` (InfoCNF: 3); 0 gives the plain LatentODE.
        label_dim: size of the label vector ``y`` (3: standardised a, b and the direction).
        obs_std: standard deviation of the Gaussian observation likelihood.
        solver: solver used in training mode; ``eval_solver`` in eval mode (default: ``solver``).
    """

    def __init__(self, obs_dim: int = 2, latent_dim: int = 5, rnn_hidden: int = 25,
                 dynamics_hidden: int = 20, decoder_hidden: int = 20, supervised_dim: int = 0,
                 label_dim: int = 3, obs_std: float = 0.3, solver: SolverConfig | None = None,
                 eval_solver: SolverConfig | None = None) -> None:
        super().__init__()
        if not 0 <= supervised_dim < latent_dim:
            raise ValueError(f"supervised_dim must be in [0, latent_dim={latent_dim}), got {supervised_dim}")
        if not obs_std > 0:
            raise ValueError(f"obs_std must be positive, got {obs_std}")
        self.obs_dim, self.latent_dim = obs_dim, latent_dim
        self.supervised_dim, self.label_dim = supervised_dim, label_dim
        self.obs_std = float(obs_std)
        self.solver = solver or SolverConfig(method="dopri5", atol=1e-3, rtol=1e-3)
        self.eval_solver = eval_solver or self.solver
        self.encoder = RecognitionRNN(obs_dim, rnn_hidden, latent_dim)
        self.dynamics = LatentDynamics(latent_dim, dynamics_hidden)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, decoder_hidden), nn.ReLU(),
                                     nn.Linear(decoder_hidden, obs_dim))
        if supervised_dim:
            self.condition = nn.Linear(label_dim, 2 * supervised_dim)  # q_phi: y -> p(z_y | y)
            self.predict = nn.Linear(supervised_dim, label_dim)  # q_theta: z_y -> y
        self.nfe = NFECounter("latent_ode")

    @property
    def partitioned(self) -> bool:
        return self.supervised_dim > 0

    def nfe_last(self) -> tuple[int, int]:
        """NFE of the last solve: ``(forward, backward)``."""
        return self.nfe.forward, self.nfe.backward

    def encode(self, x: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` of ``q(z_t0 | x)`` for ``x`` ``(batch, len(times), obs_dim)``."""
        check_sequence(x, times, self.obs_dim)
        return self.encoder(x)

    def prior(self, batch: int, labels: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` of ``p(z_t0)``: ``N(0, I)``, or ``[q_phi(y); 0]`` / ``[.; 0]`` when partitioned."""
        mean = like.new_zeros(batch, self.latent_dim)
        logvar = like.new_zeros(batch, self.latent_dim)
        if self.partitioned:
            if labels is None or labels.shape != (batch, self.label_dim):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"the partitioned LatentODE needs labels of shape ({batch}, {self.label_dim}), got {got}")
            m_y, lv_y = self.condition(labels).chunk(2, dim=-1)
            mean = torch.cat([m_y, mean[:, self.supervised_dim:]], dim=-1)
            logvar = torch.cat([lv_y, logvar[:, self.supervised_dim:]], dim=-1)
        return mean, logvar

    def predict_labels(self, z0: Tensor) -> Tensor:
        """``q_theta(z_y)``: the label prediction from the supervised code only."""
        if not self.partitioned:
            raise ValueError("predict_labels needs a partitioned model (supervised_dim > 0)")
        return self.predict(z0[..., :self.supervised_dim])

    def trajectory(self, z0: Tensor, times: Tensor) -> Tensor:
        """Solve ``dz/dt = f(z)`` from ``times[0]``; returns ``(batch, len(times), latent_dim)``."""
        cfg = self.solver if self.training else self.eval_solver
        zs = solve(self.dynamics, z0, times, cfg, self.nfe, name="latent_ode")
        return zs.transpose(0, 1)

    def decode(self, z: Tensor) -> Tensor:
        """Mean of ``p(x_t | z_t)``."""
        return self.decoder(z)

    def forward(self, x: Tensor, times: Tensor, labels: Tensor | None = None,
                sample: bool = True) -> dict[str, Tensor]:
        """ELBO terms of ``x`` observed at ``times``.

        Returns a dict with ``mean``, ``logvar`` (posterior), ``z0``, ``x_mean`` (decoded
        trajectory), ``log_px`` and ``kl`` (per sequence), ``elbo`` and, when partitioned,
        ``label_pred`` (``q_theta(z_y)``).
        """
        mean, logvar = self.encode(x, times)
        z0 = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        x_mean = self.decode(self.trajectory(z0, times))
        log_px = gaussian_log_likelihood(x, x_mean, self.obs_std)
        p_mean, p_logvar = self.prior(x.shape[0], labels, mean)
        kl = gaussian_kl(mean, logvar, p_mean, p_logvar)
        out = {"mean": mean, "logvar": logvar, "z0": z0, "x_mean": x_mean, "log_px": log_px,
               "kl": kl, "elbo": log_px - kl}
        if self.partitioned:
            out["label_pred"] = self.predict_labels(z0)
        return out

    @staticmethod
    def label_loss(pred: Tensor, labels: Tensor) -> Tensor:
        """Per-sequence supervised loss of ``q_theta``: squared error on the standardised ``(a, b)``
        plus the binary cross-entropy of the direction (last coordinate, a logit)."""
        reg = ((pred[:, :-1] - labels[:, :-1]) ** 2).sum(-1)
        cls = F.binary_cross_entropy_with_logits(pred[:, -1], labels[:, -1], reduction="none")
        return reg + cls

"""Priors over the flow's latent: the standard normal and the class-conditional Gaussians of
CCNF and InfoCNF (Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing
Flow Using Adaptive Solvers", §2.2 eq. 3-5; Nguyen et al., "On Mixed Conditional FFJORD with
Large-Batch Training", §2).

A prior maps the flat latent ``z`` (B, D) — the concatenation described in
:mod:`fastcnf.flows.sequential`, factored pieces first, final output last — and an optional label
``y`` to ``log p(z | y)``, and samples. The class-conditional prior puts ``N(mu(y), sigma^2(y))``
on a slice ``z_c`` of the latent and ``N(0, I)`` on the rest, and reads the label back with a
linear classifier on ``z_c``:

* **CCNF** (eq. 3): ``z_c`` is the whole latent ``z``.
* **InfoCNF** (§2.2, §4.1): ``z = [z_y, z_u]``; ``z_y`` (the supervised code) is
  ``supervised_fraction`` (half, "we use half of the latent code for conditioning") of the *whole*
  latent, across scales; ``z_u`` is ``N(0, I)``. Where z_y lies (the slice ``[start, start + size)``
  given to :class:`ClassConditionalGaussian`) is chosen by :mod:`fastcnf.conditioning.prior`.

``mu(y)`` and ``log sigma(y)`` come from one linear layer ``q_phi`` of the one-hot label; the
classifier ``q_theta`` is one linear layer with dropout on its input (§4.1: rate 0.5). Both are
initialised to zero, so at initialisation ``p(z | y) = N(0, I)`` exactly and the logits are 0.
The marginal ``log p(z) = logsumexp_y [log p(z | y) + log p(y)]`` uses the label prior ``p(y)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.config import ConfigError

__all__ = ["Prior", "StandardNormal", "standard_normal_logprob", "ClassConditionalGaussian", "LabelError"]


def standard_normal_logprob(z: Tensor) -> Tensor:
    """Sum over all non-batch dimensions of log N(z; 0, I)."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(1)


class Prior(nn.Module):
    """Interface: ``log_prob(z, y=None) -> (B,)``, ``sample(n, y=None) -> (n, D)``.

    ``conditional`` is True for priors that use labels; they also provide ``logits(z)``
    (classifier) and ``marginal_log_prob(z)``.
    """

    conditional = False

    def __init__(self, dim: int, latent_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.latent_sizes = list(latent_sizes) if latent_sizes is not None else [self.dim]

    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None,
               device=None, dtype=None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class StandardNormal(Prior):
    """p(z) = N(0, I); labels are ignored."""

    def log_prob(self, z, y=None):
        return standard_normal_logprob(z)

    def sample(self, n, y=None, generator=None, device=None, dtype=None):
        return torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype or torch.get_default_dtype())


class LabelError(ValueError):
    """A label the conditional prior cannot use (wrong type, shape or out of range)."""


class ClassConditionalGaussian(Prior):
    """``p(z | y) = N(z_c; mu(y), sigma^2(y)) * N(z_rest; 0, I)`` with a linear classifier on ``z_c``.

    Args:
        dim: size of the flat latent.
        num_classes: number of labels K (labels are 0..K-1).
        cond_start, cond_size: the conditioned slice ``z[:, cond_start:cond_start + cond_size]``.
        latent_sizes: sizes of the latent pieces (kept for reference).
        dropout: dropout rate on the classifier's input during training (InfoCNF §4.1: 0.5).
        label_log_prior: log p(y) (K,); uniform when None.
        learn_scale: learn ``log sigma(y)``; False fixes sigma = 1 (means only).

    Example:
        >>> prior = ClassConditionalGaussian(dim=4, num_classes=3, cond_start=0, cond_size=2)
        >>> z = torch.randn(5, 4)
        >>> bool(torch.allclose(prior.log_prob(z, torch.zeros(5, dtype=torch.long)),
        ...                     standard_normal_logprob(z)))
        True

    References: Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing Flow
    Using Adaptive Solvers", eq. 3-5 and §4.1.
    """

    conditional = True

    def __init__(self, dim: int, num_classes: int, cond_start: int, cond_size: int,
                 latent_sizes: list[int] | None = None, dropout: float = 0.5,
                 label_log_prior: Tensor | None = None, learn_scale: bool = True) -> None:
        super().__init__(dim, latent_sizes)
        if num_classes < 2:
            raise ValueError(f"a class-conditional prior needs at least 2 classes, got {num_classes}")
        if not (0 <= cond_start and cond_size >= 1 and cond_start + cond_size <= dim):
            raise ValueError(f"conditioned slice [{cond_start}, {cond_start + cond_size}) is not inside "
                             f"the latent of size {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = int(num_classes)
        self.cond_start = int(cond_start)
        self.cond_size = int(cond_size)
        self.learn_scale = bool(learn_scale)
        # q_phi: one-hot label -> (mu, log sigma); q_theta: z_c -> logits (InfoCNF §4.1: zero init)
        self.encoder = nn.Linear(self.num_classes, 2 * self.cond_size)
        self.classifier = nn.Linear(self.cond_size, self.num_classes)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.encoder, self.classifier):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if label_log_prior is None:
            label_log_prior = torch.full((self.num_classes,), -math.log(self.num_classes))
        label_log_prior = torch.as_tensor(label_log_prior, dtype=torch.get_default_dtype())
        if label_log_prior.shape != (self.num_classes,):
            raise ValueError(f"label_log_prior must have shape ({self.num_classes},), "
                             f"got {tuple(label_log_prior.shape)}")
        self.register_buffer("label_log_prior", label_log_prior)

    # ---- pieces ----------------------------------------------------------------------------
    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_c, z_rest)``: the conditioned slice and everything else (flattened)."""
        s, e = self.cond_start, self.cond_start + self.cond_size
        return z[:, s:e], torch.cat([z[:, :s], z[:, e:]], dim=1)

    def check_labels(self, y: Tensor, batch: int) -> Tensor:
        y = torch.as_tensor(y)
        if y.dim() == 0:
            y = y.expand(batch)
        if y.dtype.is_floating_point or y.dtype == torch.bool or tuple(y.shape) != (batch,):
            raise LabelError(f"labels must be integers of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
        bad = (y < 0) | (y >= self.num_classes)
        if bad.any():
            raise LabelError(f"unknown label {int(y[bad][0])}: labels must be in 0..{self.num_classes - 1}")
        return y.long()

    def class_params(self, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, log_sigma)`` of the labels ``y`` (B, cond_size), or of every class (K, cond_size)."""
        eye = torch.eye(self.num_classes, dtype=self.encoder.weight.dtype, device=self.encoder.weight.device)
        onehot = eye if y is None else eye[y]
        mu, log_sigma = self.encoder(onehot).chunk(2, dim=1)
        if not self.learn_scale:
            log_sigma = torch.zeros_like(log_sigma)
        return mu, log_sigma

    @staticmethod
    def _gaussian_logprob(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
        return (-0.5 * ((z - mu) * torch.exp(-log_sigma)).pow(2) - log_sigma
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    # ---- the Prior interface -------------------------------------------------------------
    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(z | y)`` (InfoCNF eq. 5, the prior terms); the marginal ``log p(z)`` when ``y`` is None."""
        if y is None:
            return self.marginal_log_prob(z)
        y = self.check_labels(y, z.shape[0]).to(z.device)
        mu, log_sigma = self.class_params(y)
        # pad (mu, log sigma) with (0, 0) outside the slice and sum once over all of z, so that the
        # zero-initialised prior reproduces N(0, I)'s log-density bit for bit
        pad = (self.cond_start, self.dim - self.cond_start - self.cond_size)
        return self._gaussian_logprob(z, F.pad(mu, pad).to(z.dtype), F.pad(log_sigma, pad).to(z.dtype))

    def class_log_probs(self, z: Tensor) -> Tensor:
        """``log p(z | y=k)`` for every class k: (B, K)."""
        z_c, z_rest = self.split(z)
        mu, log_sigma = self.class_params()
        lp = self._gaussian_logprob(z_c[:, None, :], mu[None], log_sigma[None])
        return lp + standard_normal_logprob(z_rest)[:, None]

    def marginal_log_prob(self, z: Tensor) -> Tensor:
        """``log p(z) = logsumexp_k [log p(z | k) + log p(k)]`` (B,)."""
        return torch.logsumexp(self.class_log_probs(z) + self.label_log_prior.to(z.dtype), dim=1)

    def fix_class_means(self, norm: float, generator: torch.Generator | None = None) -> None:
        """Freeze ``mu(y)`` to ``norm`` times a unit direction per class (random orthonormal ones when
        the conditioned slice has at least as many dimensions as classes, evenly spaced points on a
        line in 1-D) and sigma to 1: the source of class-conditional flow matching, which does not
        train the prior. Labels are then read back by Bayes' rule (:meth:`classify`)."""
        k, d = self.num_classes, self.cond_size
        if d >= k:  # orthonormal directions: every pair of means is norm * sqrt(2) apart
            q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
            directions = q.T
        elif d == 1:  # a line: means evenly spaced on [-norm, norm]
            directions = torch.linspace(-1.0, 1.0, k, dtype=torch.float64).reshape(k, 1)
        else:
            directions = torch.randn(k, d, generator=generator, dtype=torch.float64)
            directions = directions / directions.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.encoder.bias.zero_()
            self.encoder.weight[:self.cond_size] = (norm * directions).T.to(self.encoder.weight)
        self.encoder.requires_grad_(False)
        self.classifier.requires_grad_(False)
        self.learn_scale = False
        self.bayes_classifier = True

    def classify(self, z: Tensor) -> Tensor:
        """Class scores (B, K): the linear classifier ``q_theta`` (CCNF / InfoCNF), or the Bayes
        posterior ``log p(z | k) + log p(k)`` for a prior with fixed means."""
        if getattr(self, "bayes_classifier", False):
            return self.class_log_probs(z) + self.label_log_prior.to(z.dtype)
        return self.logits(z)

    def logits(self, z: Tensor) -> Tensor:
        """Classifier ``q_theta(z_c)`` (B, K); dropout on its input in training mode (InfoCNF §4.1)."""
        z_c, _ = self.split(z)
        return self.classifier(self.dropout(z_c))

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None,
               device=None, dtype=None) -> Tensor:
        """``z ~ p(z | y)``; with ``y`` None the labels are drawn from ``p(y)`` first."""
        dtype = dtype or torch.get_default_dtype()
        if y is None:
            probs = self.label_log_prior.exp().cpu()
            y = torch.multinomial(probs, n, replacement=True, generator=generator)
        y = self.check_labels(y, n)
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype,
                        device=device if generator is None else generator.device)
        z = z.to(device)
        mu, log_sigma = self.class_params(y.to(self.encoder.weight.device))
        s, e = self.cond_start, self.cond_start + self.cond_size
        z_c = mu.to(z) + torch.exp(log_sigma).to(z) * z[:, s:e]
        return torch.cat([z[:, :s], z_c, z[:, e:]], dim=1)


# ---------------------------------------------------------------------------------------------
# which slice each kind conditions, and the label prior
# ---------------------------------------------------------------------------------------------

"""The ``latent_ode`` task: train a (partitioned) LatentODE on the spirals in the one trainer loop.

Per step the batch ``x`` is ``(B, T, 6)`` spiral sequences (channels of
:data:`fastcnf.data.spirals.SPIRAL_CHANNELS`) and ``y`` the directions. The model observes the
first ``n_observed`` noisy points; the loss is the negative ELBO per sequence (nats), plus, for the
partitioned model, ``supervised_weight`` times ``q_theta``'s label loss (InfoCNF eq. 3's supervised
term). The label vector is ``y = ((a - 1.0) / 0.08, (b - 0.25) / 0.03, direction)``: a and b are
standardised with the generator's own distribution so the linear ``q_phi``/``q_theta`` see unit
scales.

Evaluation (test split, eval mode: ``eval.atol``/``eval.rtol`` for adaptive solvers):

* ``test_nll_nats``: negative ELBO per test sequence (one reparameterised sample drawn with
  ``eval.seed``); for the partitioned model it is the conditional ``-ELBO(x | y)`` (prior of
  ``z_y`` given the label, as InfoCNF reports conditional NLLs). ``test_bits_per_dim``: None.
* ``reconstruction_mse``: mean squared error between the decoded trajectory from the posterior
  mean of ``z_t0`` and the *noise-free* spiral over the observed window;
* ``extrapolation_mse``: the same over the ``n_extrapolate`` steps after the window (never seen);
* ``direction_accuracy``: partitioned: ``q_theta``'s direction from the posterior mean of ``z_y``;
  baseline: the logistic-regression probe below;
* ``direction_accuracy_probe``: logistic regression (scikit-learn) fitted on the posterior means of
  ``z_t0`` of ``latent_ode.probe_examples`` training sequences, scored on the test split (both models).

References: Nguyen et al. 2019, "InfoCNF", §4.6, Appendix E, Figure 6; Rubanova et al. 2019,
"Latent ODEs for Irregularly-Sampled Time Series".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastcnf.config import ConfigError
from fastcnf.data.spirals import PARAM_MEAN, PARAM_STD, SpiralBundle
from fastcnf.evaluation.metrics import fork_rng, test_batches
from fastcnf.evaluation.plots import plot_trajectories
from fastcnf.models.latent_ode import LatentODE
from fastcnf.method import StepContext
from fastcnf.training.tasks import Task

__all__ = ["LatentODETask", "spiral_labels"]


def spiral_labels(x: Tensor, direction: Tensor) -> Tensor:
    """``(B, 3)`` label vector ``((a - 1) / 0.08, (b - 0.25) / 0.03, direction)`` of spiral batches."""
    a = (x[:, 0, 4] - PARAM_MEAN[0]) / PARAM_STD[0]
    b = (x[:, 0, 5] - PARAM_MEAN[1]) / PARAM_STD[1]
    return torch.stack([a, b, direction.to(x.dtype)], dim=-1)


class LatentODETask(Task):
    """LatentODE / partitioned LatentODE on :func:`fastcnf.data.spirals.load_spirals` data."""

    name = "latent_ode"

    def __init__(self, cfg, bundle) -> None:
        if not isinstance(bundle, SpiralBundle):
            raise ConfigError(f"task latent_ode needs sequence data (data.name: spirals), got {bundle.name!r}")
        super().__init__(cfg, bundle)
        stride = cfg.latent_ode.time_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= bundle.n_observed // 2:
            raise ConfigError(f"latent_ode.time_stride must be an integer in [1, {bundle.n_observed // 2}] "
                             f"(at least 2 observed steps), got {stride!r}")
        #: time indices the model sees: all steps kept, and those of the observed window
        self.steps = torch.arange(0, bundle.times.shape[0], stride)
        self.n_observed = int((self.steps < bundle.n_observed).sum())
        self.times = bundle.times[self.steps]

    def build_model(self) -> LatentODE:
        c, s = self.cfg.latent_ode, self.cfg.solver
        eval_solver = s.with_tolerance(self.cfg.eval.atol, self.cfg.eval.rtol) if s.adaptive else s
        return LatentODE(obs_dim=2, latent_dim=c.latent_dim, rnn_hidden=c.rnn_hidden,
                         dynamics_hidden=c.dynamics_hidden, decoder_hidden=c.decoder_hidden,
                         supervised_dim=c.supervised_dim, label_dim=3, obs_std=c.obs_std,
                         solver=s, eval_solver=eval_solver)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Observed noisy points ``(B, n_observed, 2)`` and their times (after ``time_stride``)."""
        obs = x[:, self.steps[:self.n_observed].to(x.device), 0:2]
        return obs, self.times[:self.n_observed].to(x.device, x.dtype)

    def _truth(self, x: Tensor) -> Tensor:
        """Noise-free spiral at every kept step (observed window + horizon), ``(B, T', 2)``."""
        return x[:, self.steps.to(x.device), 2:4]

    def step(self, model: LatentODE, ctx: StepContext) -> None:
        x, y = ctx["x"], ctx["y"]
        obs, times = self._split(x)
        labels = spiral_labels(x, y)
        out = model(obs, times, labels=labels if model.partitioned else None)
        nll = -out["elbo"].mean()
        ctx.update(elbo=out["elbo"], kl=out["kl"].mean(), log_px=out["log_px"], nll=nll)
        loss = nll
        if model.partitioned:
            sup = model.label_loss(out["label_pred"], labels).mean()
            ctx["supervised_loss"] = sup
            loss = loss + self.cfg.latent_ode.supervised_weight * sup
        ctx["loss"] = loss

    @torch.no_grad()
    def _posterior_means(self, model: LatentODE, split, n: int, device, dtype) -> Tensor:
        means = []
        for xb, _ in test_batches(split, n, self.cfg.eval.batch_size):
            obs, times = self._split(xb.to(device, dtype))
            means.append(model.encode(obs, times)[0].cpu())
        return torch.cat(means)

    @torch.no_grad()
    def predict(self, model: LatentODE, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior-mean trajectory over observed + horizon times: ``(x_mean (B, T, 2), z0 mean)``."""
        obs, times = self._split(x)
        mean, _ = model.encode(obs, times)
        all_times = self.times.to(x.device, x.dtype)
        return model.decode(model.trajectory(mean, all_times)), mean

    @torch.no_grad()
    def evaluate(self, model: LatentODE, device, dtype) -> dict[str, Any]:
        cfg, split = self.cfg, self.bundle.test
        n = len(split) if cfg.eval.max_examples <= 0 else min(cfg.eval.max_examples, len(split))
        n_obs = self.n_observed
        was_training = model.training
        model.eval()
        sums = {"neg_elbo": 0.0, "kl": 0.0, "rec": 0.0, "ext": 0.0, "correct": 0.0}
        nfe, batches = 0, 0
        with fork_rng(cfg.eval.seed):
            for xb, yb in test_batches(split, n, cfg.eval.batch_size):
                xb, yb = xb.to(device, dtype), yb.to(device)
                obs, times = self._split(xb)
                labels = spiral_labels(xb, yb)
                out = model(obs, times, labels=labels if model.partitioned else None)
                nfe += model.nfe_last()[0]
                batches += 1
                sums["neg_elbo"] += float(-out["elbo"].double().sum())
                sums["kl"] += float(out["kl"].double().sum())
                x_mean, mean = self.predict(model, xb)
                err = (x_mean - self._truth(xb)).double() ** 2
                sums["rec"] += float(err[:, :n_obs].mean(dim=(1, 2)).sum())
                sums["ext"] += float(err[:, n_obs:].mean(dim=(1, 2)).sum()) if err.shape[1] > n_obs else float("nan")
                if model.partitioned:
                    sums["correct"] += float(((model.predict_labels(mean)[:, -1] > 0).long() == yb).sum())
        probe = self._probe_accuracy(model, n, device, dtype)
        model.train(was_training)
        return {
            "test_nll_nats": sums["neg_elbo"] / n,
            "test_bits_per_dim": None,
            "test_kl_nats": sums["kl"] / n,
            "reconstruction_mse": sums["rec"] / n,
            "extrapolation_mse": sums["ext"] / n,
            "direction_accuracy": sums["correct"] / n if model.partitioned else probe,
            "direction_accuracy_probe": probe,
            "test_examples": n,
            "eval_nfe_forward": nfe / max(batches, 1),
            "eval_tol": cfg.eval.atol,
            "partitioned": model.partitioned,
        }

    def _probe_accuracy(self, model: LatentODE, n_test: int, device, dtype) -> float | None:
        from sklearn.linear_model import LogisticRegression

        train = self.bundle.train
        n_fit = min(self.cfg.latent_ode.probe_examples, len(train))
        y_fit = train.y[:n_fit].numpy()
        if n_fit < 2 or len(np.unique(y_fit)) < 2:
            return None
        z_fit = self._posterior_means(model, train, n_fit, device, dtype).double().numpy()
        z_test = self._posterior_means(model, self.bundle.test, n_test, device, dtype).double().numpy()
        clf = LogisticRegression(max_iter=1000).fit(z_fit, y_fit)
        return float(clf.score(z_test, self.bundle.test.y[:n_test].numpy()))

    def figures(self, model: LatentODE, fig_dir, device, dtype) -> None:
        """``trajectories.png``: test spirals, their noisy observations, the reconstruction (solid)
        and the extrapolation (dashed) from the posterior mean (InfoCNF Figure 6 style)."""
        x, _ = self.figure_trajectories(model, device, dtype)
        test = self.bundle.test
        plot_trajectories(test.x[:len(x)][:, self.steps], test.y[:len(x)], x, self.n_observed,
                          title="partitioned LatentODE" if model.partitioned else "LatentODE",
                          path=Path(fig_dir) / "trajectories.png")

    def figure_trajectories(self, model: LatentODE, device, dtype) -> tuple[Tensor, Tensor]:
        was = model.training
        model.eval()
        k = min(self.cfg.latent_ode.n_figure, len(self.bundle.test))
        out = self.predict(model, self.bundle.test.x[:k].to(device, dtype))
        model.train(was)
        return out[0].cpu().float(), out[1].cpu()

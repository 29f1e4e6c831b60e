"""The latent_ode task (fastcnf.training.latent_ode_task; Nguyen et al. 2019, "InfoCNF", §4.6) end to end
through the one trainer (tiny sizes), its loss against an independent ELBO, and its evaluation count."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torchdiffeq import odeint

from fastcnf.config import ConfigError
from fastcnf.methods import load_recipe
from fastcnf.method import StepContext
from fastcnf.training.trainer import Trainer

TINY = ["train.iterations=3", "data.n_train=20", "data.n_test=10", "train.batch_size=10",
        "latent_ode.time_stride=20", "latent_ode.probe_examples=20", "latent_ode.n_figure=2",
        "eval.batch_size=10", "train.checkpoint_every=0"]


@pytest.mark.parametrize("recipe", ["spirals-latentode", "spirals-latentode-partitioned"])
def test_recipes_train_and_report_the_sequence_metrics(recipe, tmp_path):
    cfg = load_recipe(recipe, TINY)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    m = trainer.fit()
    for key in ("test_nll_nats", "reconstruction_mse", "extrapolation_mse", "direction_accuracy"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["test_bits_per_dim"] is None and m["nfe_forward_mean"] > 0 and m["nfe_backward_mean"] > 0
    assert m["partitioned"] == (recipe == "spirals-latentode-partitioned")
    assert (tmp_path / "run" / "figures" / "trajectories.png").exists()
    # time_stride 20: 10 observed + 5 extrapolated steps
    assert trainer.task.n_observed == 10 and trainer.task.times.shape == (15,)


def test_partitioned_loss_equals_an_independent_elbo_and_label_loss(tmp_path):
    """The task's loss against references computed here: the observed points taken at the stride,
    ``log p(x | z)`` along a torchdiffeq solve of the latent dynamics, the closed-form Gaussian KL of
    torch.distributions to the label-conditioned prior, and the label loss on ``(a, b)`` standardised
    with the generator's distribution plus the direction's cross-entropy."""
    cfg = load_recipe("spirals-latentode-partitioned", TINY + [
        "latent_ode.supervised_weight=2.5", "dtype=float64", "solver.atol=1e-9", "solver.rtol=1e-9"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    model, bundle = trainer.model, trainer.bundle
    x, direction = bundle.train.x[:10].double(), bundle.train.y[:10]
    ctx = StepContext(x=x, y=direction)
    torch.manual_seed(0)
    trainer.task.step(model, ctx)
    # the reference, from the same reparameterisation noise
    obs, times = x[:, :bundle.n_observed:20, 0:2], bundle.times[:bundle.n_observed:20].double()
    with torch.no_grad():
        mean, logvar = model.encode(obs, times)
        torch.manual_seed(0)
        z0 = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        zs = odeint(lambda t, z: model.dynamics(t, z), z0, times, atol=1e-10, rtol=1e-10).transpose(0, 1)
        x_mean = model.decoder(zs)
        log_px = Normal(x_mean, cfg.latent_ode.obs_std).log_prob(obs).sum((1, 2))
        labels = torch.stack([(x[:, 0, 4] - 1.0) / 0.08, (x[:, 0, 5] - 0.25) / 0.03, direction.double()], 1)
        k = cfg.latent_ode.supervised_dim
        m_y, lv_y = model.condition(labels).chunk(2, dim=-1)
        prior = Normal(torch.cat([m_y, torch.zeros_like(mean[:, k:])], 1),
                       torch.cat([(0.5 * lv_y).exp(), torch.ones_like(mean[:, k:])], 1))
        kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), prior).sum(1)
        pred = model.predict(z0[:, :k])
        label_loss = ((pred[:, :2] - labels[:, :2]) ** 2).sum(1) + F.binary_cross_entropy_with_logits(
            pred[:, 2], labels[:, 2], reduction="none")
    nll = -(log_px - kl).mean()
    torch.testing.assert_close(ctx["kl"].detach(), kl.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(ctx["nll"].detach(), nll, rtol=1e-6, atol=0)
    torch.testing.assert_close(ctx["loss"].detach(), nll + 2.5 * label_loss.mean(), rtol=1e-6, atol=0)
    assert float(kl.min()) > 0 and float(label_loss.mean()) > 0


@pytest.mark.parametrize("max_examples", [3, 4, 7, 20], ids=["below-batch", "one-batch", "above-batch",
                                                             "beyond-split"])
def test_evaluation_counts_max_examples_and_averages_the_negative_elbo(tmp_path, max_examples):
    cfg = load_recipe("spirals-latentode", TINY + [
        "data.n_test=8", "eval.batch_size=4", f"eval.max_examples={max_examples}", "eval.seed=11",
        "latent_ode.probe_examples=0"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    model, bundle = trainer.model, trainer.bundle
    metrics = trainer.task.evaluate(model, torch.device("cpu"), torch.float32)
    n = min(max_examples, len(bundle.test))
    assert metrics["test_examples"] == n
    # reference: the model's ELBO on the first n test sequences, noise from eval.seed in batch order
    model.eval()
    torch.manual_seed(11)
    neg_elbo = []
    with torch.no_grad():
        for start in range(0, n, 4):
            x = bundle.test.x[start:min(start + 4, n)]
            obs, times = x[:, :bundle.n_observed:20, 0:2], bundle.times[:bundle.n_observed:20]
            neg_elbo.append(-model(obs, times)["elbo"].double())
    assert metrics["test_nll_nats"] == pytest.approx(float(torch.cat(neg_elbo).mean()), rel=1e-5)


def test_bad_time_stride_is_a_clear_error(tmp_path):
    cfg = load_recipe("spirals-latentode", TINY[:-5] + ["latent_ode.time_stride=0"])
    with pytest.raises(ValueError, match="time_stride must be an integer in"):
        Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    with pytest.raises(ConfigError):
        load_recipe("spirals-latentode", ["latent_ode.no_such_key=1"])

"""The latent_ode task end to end through the one trainer (tiny sizes)."""
import math

import pytest
import torch

from fastcnf.config import ConfigError, load_recipe
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


def test_partitioned_loss_is_negative_elbo_plus_weighted_label_loss(tmp_path):
    cfg = load_recipe("spirals-latentode-partitioned", TINY + ["latent_ode.supervised_weight=2.5"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    x, y = trainer.bundle.train.x[:10], trainer.bundle.train.y[:10]
    from fastcnf.training.hooks import StepContext

    ctx = StepContext(x=x, y=y)
    torch.manual_seed(0)
    trainer.task.step(trainer.model, ctx)
    assert torch.allclose(ctx["loss"], ctx["nll"] + 2.5 * ctx["supervised_loss"])
    assert torch.allclose(ctx["nll"], -ctx["elbo"].mean())


def test_bad_time_stride_is_a_clear_error(tmp_path):
    cfg = load_recipe("spirals-latentode", TINY[:-5] + ["latent_ode.time_stride=0"])
    with pytest.raises(ValueError, match="time_stride must be an integer in"):
        Trainer(cfg, tmp_path / "run", quiet=True, progress=False)
    with pytest.raises(ConfigError):
        load_recipe("spirals-latentode", ["latent_ode.no_such_key=1"])

"""Configuration sections of data-parallel training and of the LatentODE task."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastcnf.config.errors import ConfigError, check_tolerance
from fastcnf.config.section import Section

__all__ = ["DistributedConfig", "LatentODEConfig"]


@dataclass
class DistributedConfig(Section):
    """Data-parallel training under torchrun.

    Launch with ``torchrun --nproc_per_node N -m fastcnf train RECIPE --out DIR``; without
    torchrun's variables training runs in one process. ``train.batch_size`` is the global batch.

    Attributes:
        backend: auto (nccl on GPU, gloo on CPU), gloo or nccl.
        timeout_minutes: collective timeout (rank 0 evaluates alone while the others wait).
        broadcast_buffers: after each step copy buffers and the parameters the main optimiser
            does not own (stepped by hooks) from rank 0, so every rank holds the same model.
        check_every: every this many steps verify that all ranks hold identical parameters (0: never).
    """

    _key = "distributed"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_minutes: int = 60
    broadcast_buffers: bool = True
    check_every: int = 0


@dataclass
class LatentODEConfig(Section):
    """LatentODE on the bi-directional spirals (Rubanova et al. 2019; partitioned latent as in
    Nguyen et al. 2019, InfoCNF §4.6 and Appendix E; ``task: latent_ode``).

    Attributes:
        latent_dim: dimension of the initial latent state z_t0 (5).
        supervised_dim: size of the supervised code z_y (the first coordinates of z_t0) conditioned
            on y = (a, b, direction) by a linear q_phi and predicting y by a linear q_theta (3);
            0 = plain LatentODE (no partition).
        rnn_hidden: hidden units of the time-reversed recognition RNN (25).
        dynamics_hidden: hidden units of the one-hidden-layer dynamics MLP (20).
        decoder_hidden: hidden units of the one-hidden-layer decoder MLP (20).
        obs_std: standard deviation of the Gaussian observation likelihood (the data's noise, 0.3).
        supervised_weight: weight of q_theta's label loss added to the negative ELBO.
        probe_examples: training sequences used to fit the logistic-regression probe of the
            direction on the posterior mean of z_t0 (reported for both models).
        n_figure: test spirals drawn in the trajectory figure.
        time_stride: use every ``time_stride``-th time step of each sequence; 1 = all 200 + 100 steps.
    """

    _key = "latent_ode"
    latent_dim: int = 5
    supervised_dim: int = 0
    rnn_hidden: int = 25
    dynamics_hidden: int = 20
    decoder_hidden: int = 20
    obs_std: float = 0.3
    supervised_weight: float = 1.0
    probe_examples: int = 1000
    n_figure: int = 6
    time_stride: int = 1



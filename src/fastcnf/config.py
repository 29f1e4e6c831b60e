"""Configuration as data: dataclasses mapped from recipe YAML, dotted overrides, strict keys.

A run is fully described by a :class:`Config`. Recipes (``src/fastcnf/recipes/*.yaml``) give
values for some fields; ``--set a.b=value`` overrides them (values parsed as YAML scalars/lists).
Unknown keys are rejected with the closest valid key and the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastcnf.data.registry import DataConfig
from fastcnf.ode.solve import SolverConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "RECIPE_DIR",
    "list_recipes",
    "load_recipe",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A bad configuration: unknown key, malformed value, unknown recipe."""


@dataclass
class ModelConfig:
    """The model.

    Attributes:
        arch: ``mlp`` (CNF blocks on vectors), ``multiscale`` (FFJORD image architecture) or ``glow``.
        hidden_dims: hidden widths of each dynamics network (FFJORD toy: 64-64-64; images: 64-64-64).
        activation: tanh, softplus, relu, elu or swish (toy: tanh; images: softplus).
        num_blocks: ``mlp``: stacked CNF blocks; ``multiscale``: blocks before and after each squeeze.
        n_scales: multiscale scales (0: FFJORD's automatic choice).
        divergence: ``exact`` or ``hutchinson``.
        exact_mode: exact trace implementation: auto (network forward-mode trace when available), loop, vmap.
        noise: Hutchinson noise: gaussian or rademacher.
        end_time: T0 of every block (FFJORD toy 0.5, images 1.0).
        train_end_time: train T jointly with the network (plain gradient; TO-FLOW is an end-time policy).
        logit_alpha: alpha of the logit transform at the input of image models.
        kinetic_weight: weight of the RNODE kinetic-energy regulariser (0: off).
        jacobian_weight: weight of the RNODE Jacobian-Frobenius regulariser (0: off).
        regularizer_reduction: unit of the regulariser rates: ``sum`` over dimensions (RNODE eq. 3-4),
            ``mean`` over them (RNODE's code; matches a bits/dim loss) or ``auto`` (mean on image data,
            whose loss is bits/dim, sum otherwise), so one weight means the same on toys and images.
        glow_levels: ``glow``: levels L (squeeze, K steps, split; Glow: 3 for 32x32 images).
        glow_steps: ``glow``: flow steps K per level (actnorm, 1x1 conv, coupling; Glow: 32).
        glow_hidden: ``glow``: hidden channels of the coupling networks (Glow: 512).
        glow_lu: ``glow``: LU-parametrised invertible 1x1 convolutions.
        glow_preprocess: ``glow``: ``shift`` (x - 0.5, Glow) or ``logit`` (with ``logit_alpha``).
    """

    arch: str = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    activation: str = "tanh"
    num_blocks: int = 1
    n_scales: int = 0
    divergence: str = "exact"
    exact_mode: str = "auto"
    noise: str = "gaussian"
    end_time: float = 0.5
    train_end_time: bool = False
    logit_alpha: float = 1e-6
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    regularizer_reduction: str = "auto"
    glow_levels: int = 3
    glow_steps: int = 32
    glow_hidden: int = 512
    glow_lu: bool = True
    glow_preprocess: str = "shift"


@dataclass
class TrainConfig:
    """The optimisation.

    Attributes:
        iterations: optimiser steps.
        batch_size: examples per step.
        lr: learning rate (before scaling and schedules).
        weight_decay: L2 weight decay (Adam) or decoupled (AdamW).
        optimizer: adam or adamw.
        schedule: constant, step (decay by ``decay_factor`` at each of ``decay_at``) or cosine.
        warmup_iterations: linear warm-up from 0 over this many iterations (0: none).
        decay_at: iterations (or epochs, see ``decay_unit``) at which the step schedule decays.
        decay_unit: iterations or epochs.
        decay_factor: multiplicative decay of the step schedule.
        min_lr: floor of the cosine schedule.
        grad_clip: clip the gradient norm to this value (0: off).
        eval_every: evaluate on the test split every this many iterations (0: only at the end).
        checkpoint_every: write a checkpoint every this many iterations (0: only at the end).
        log_every: refresh the progress bar / log line every this many iterations.
        accumulation_steps: micro-batches per optimiser step on each process; ``batch_size`` stays
            the global batch and the accumulated gradient equals the full-batch gradient.
        lr_scaling: none, linear or sqrt: the rate used is ``lr * (batch_size /
            reference_batch_size)`` (linear) or its square root (Goyal et al. 2017; 002 §4.5).
        reference_batch_size: the batch ``lr`` was tuned for (0: ``batch_size``, no scaling).
    """

    iterations: int = 1000
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_iterations: int = 0
    decay_at: list[int] = field(default_factory=list)
    decay_unit: str = "iterations"
    decay_factor: float = 0.1
    min_lr: float = 0.0
    grad_clip: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    accumulation_steps: int = 1
    lr_scaling: str = "none"
    reference_batch_size: int = 0


@dataclass
class EvalConfig:
    """Evaluation on the test split.

    Attributes:
        atol, rtol: solver tolerances at evaluation (002 §4.2: 1e-5).
        batch_size: evaluation batch size.
        max_examples: evaluate on at most this many test examples (0: all).
        n_samples: samples drawn for the figures.
        seed: seed of evaluation noise (dequantisation, Hutchinson), so evaluations are repeatable.
        figures: write the figures at the end of training (density maps and samples cost solves).
    """

    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 1000
    max_examples: int = 0
    n_samples: int = 64
    seed: int = 1234
    figures: bool = True


# ---- feature sections: each is owned by its feature module (see the docstrings) -------------

@dataclass
class ConditioningConfig:
    """Class conditioning (CCNF / InfoCNF, 002 §2; implemented in fastcnf.conditioning and
    fastcnf.training.conditioning).

    Attributes:
        kind: none, ccnf (class-conditional Gaussian on the whole latent z, 002 eq. 3) or infocnf
            (on the supervised code z_y only: the first ``supervised_fraction`` of the final
            latent piece, i.e. the last scale's output; the rest of z is N(0, I); 002 §2.2).
        beta: weight of the classifier's cross-entropy in the loss (002 eq. 4); the NLL part is in
            bits/dim for images and nats for vectors, as the density loss.
        supervised_fraction: infocnf: fraction of the final latent piece that forms z_y (002: 0.5).
        dropout: dropout rate on the linear classifier's input during training (002 §4.1: 0.5).
        learn_scale: learn log sigma(y) as well as mu(y); false fixes sigma = 1.
        label_prior: p(y) of the marginal likelihood and of unlabelled sampling: uniform or
            empirical (the training split's label frequencies).
    """

    kind: str = "none"
    beta: float = 1.0
    supervised_fraction: float = 0.5
    dropout: float = 0.5
    learn_scale: bool = True
    label_prior: str = "uniform"

    def __post_init__(self) -> None:
        kinds = ("none", "ccnf", "infocnf")
        if self.kind not in kinds:
            raise ValueError(f"conditioning.kind={self.kind!r} is not valid; accepted: {', '.join(kinds)}")
        if self.label_prior not in ("uniform", "empirical"):
            raise ValueError(f"conditioning.label_prior={self.label_prior!r} is not valid; accepted: uniform, empirical")
        if not 0.0 < self.supervised_fraction <= 1.0:
            raise ValueError(f"conditioning.supervised_fraction must be in (0, 1], got {self.supervised_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"conditioning.dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ValueError(f"conditioning.beta must be >= 0, got {self.beta}")


@dataclass
class TolerancesConfig:
    """Solver-tolerance policy (002 §3; fastcnf.ode.tolerances, fastcnf.training.tolerances).

    Every tolerance must lie in (0, 1). Lists are per CNF block in forward order
    (``model.cnf_blocks()``); a single value applies to every block; empty keeps ``solver.*``.

    Attributes:
        policy: fixed (one tolerance, ``atol`` or solver.atol), per_block (``atol`` list) or
            learned (a gating network per block samples log10(tolerance) per batch; 002 §3).
        atol, rtol: forward-solve tolerances (fixed / per_block; rtol empty: equal to atol).
        adjoint_atol, adjoint_rtol: backward (adjoint) solve tolerances, any policy
            (empty: solver.adjoint_atol/adjoint_rtol, else the forward tolerance).
        init_tol: learned: initial gate mean tolerance (0: solver.atol).
        init_std: learned: initial std of the Gaussian over log10(tolerance).
        min_std: learned: floor of that std (keeps exploring).
        min_tol, max_tol: learned: sampled tolerances are clamped to [min_tol, max_tol].
        gate_hidden: learned: width of each gate (MLP on vectors, small CNN on images).
        gate_lr: learned: Adam learning rate of the gates (their own optimiser).
        alpha: learned: weight of the reward -NFE against the loss (002 eq. 6).
        baseline_momentum: learned: momentum of the moving-average baseline of the returns.
        loss_baseline_momentum: learned: momentum of the baseline of the returns' loss part
            ``-L`` (null: ``baseline_momentum``, i.e. one moving average of the whole return).
            The loss falls fast early in training, so a slow average of it lags and adds a large
            action-independent term to every advantage; 0 uses the previous step's loss. Any
            value is an unbiased baseline (computed from past steps only).
        include_loss: learned: the return r_i includes -L (002 eq. 7); false: reward -NFE only.
        eval_tolerance: learned: at evaluation solve at eval.atol/rtol (fixed; 002 §4.2) or at
            each gate's mean tolerance (mean; 002 appendix D).
    """

    policy: str = "fixed"
    atol: list[float] = field(default_factory=list)
    rtol: list[float] = field(default_factory=list)
    adjoint_atol: list[float] = field(default_factory=list)
    adjoint_rtol: list[float] = field(default_factory=list)
    init_tol: float = 0.0
    init_std: float = 0.5
    min_std: float = 0.05
    min_tol: float = 1e-8
    max_tol: float = 1e-1
    gate_hidden: int = 16
    gate_lr: float = 1e-2
    alpha: float = 0.01
    baseline_momentum: float = 0.9
    loss_baseline_momentum: float | None = None
    include_loss: bool = True
    eval_tolerance: str = "fixed"

    def __post_init__(self) -> None:
        from fastcnf.ode.tolerances import TOLERANCE_POLICIES, check_tolerance

        if self.policy not in TOLERANCE_POLICIES:
            close = difflib.get_close_matches(self.policy, list(TOLERANCE_POLICIES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"tolerances.policy={self.policy!r} is not valid{hint}; "
                             f"accepted: {', '.join(TOLERANCE_POLICIES)}")
        for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            for i, v in enumerate(getattr(self, key)):
                check_tolerance(v, f"tolerances.{key}[{i}]")
        if self.init_tol != 0.0:
            check_tolerance(self.init_tol, "tolerances.init_tol")
        check_tolerance(self.min_tol, "tolerances.min_tol")
        check_tolerance(self.max_tol, "tolerances.max_tol")
        if not self.min_tol < self.max_tol:
            raise ValueError(f"tolerances.min_tol={self.min_tol} must be below tolerances.max_tol={self.max_tol}")
        if not self.init_std > self.min_std > 0:
            raise ValueError(f"tolerances.init_std ({self.init_std}) must exceed tolerances.min_std ({self.min_std}) > 0")
        if self.eval_tolerance not in ("fixed", "mean"):
            raise ValueError(f"tolerances.eval_tolerance={self.eval_tolerance!r} is not valid; accepted: fixed, mean")
        for key in ("baseline_momentum", "loss_baseline_momentum"):
            m = getattr(self, key)
            if m is not None and not 0.0 <= m < 1.0:
                raise ValueError(f"tolerances.{key}={m} must be in [0, 1)")
        if self.alpha < 0 or self.gate_lr <= 0 or self.gate_hidden <= 0:
            raise ValueError("tolerances.alpha must be >= 0, tolerances.gate_lr and gate_hidden positive")


@dataclass
class EndTimeConfig:
    """End-time policy (TO-FLOW 004, STEER; fastcnf.cnf.endtime and fastcnf.training.endtime).

    T0, the initial (toflow), fixed (fixed) or central (steer) end time of every block, is
    ``model.end_time`` (004 §4: 0.5 on toy data, 1 on images).

    Attributes:
        policy: fixed (T = T0; ``model.train_end_time: true`` = joint), joint (T an ordinary
            parameter of the main optimiser), toflow (004 Algorithm 1: coordinate descent on T with
            its own Adam, temporal regularisation, clipping) or steer (T ~ U[T0 - b, T0 + b] in
            training, T0 at evaluation).
        lr: toflow: learning rate of T's own Adam (004 §4: 1e-2); not scaled by the schedule.
        alpha: toflow: weight of the temporal regulariser alpha * |T| (004 eq. 15-16: 0.1).
        clip_eps: toflow: eps of the clipping T in [eps, 2 T0 - eps] (004 eq. 17: 0.1); 0 < eps < T0.
        steer_b: steer: half-width b of the uniform end-time interval; 0 < b < T0.
    """

    policy: str = "fixed"
    lr: float = 1e-2
    alpha: float = 0.1
    clip_eps: float = 0.1
    steer_b: float = 0.25

    def __post_init__(self) -> None:
        from fastcnf.cnf.endtime import END_TIME_POLICIES

        if self.policy not in END_TIME_POLICIES:
            close = difflib.get_close_matches(str(self.policy), list(END_TIME_POLICIES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"endtime.policy={self.policy!r} is not valid{hint}; "
                              f"accepted: {', '.join(END_TIME_POLICIES)}")
        if not self.lr > 0:
            raise ConfigError(f"endtime.lr must be positive, got {self.lr!r}")
        if not self.alpha >= 0:
            raise ConfigError(f"endtime.alpha must be >= 0, got {self.alpha!r}")
        if not self.clip_eps > 0:
            raise ConfigError(f"endtime.clip_eps must be positive (and below T0 = model.end_time), got {self.clip_eps!r}")
        if not self.steer_b > 0:
            raise ConfigError(f"endtime.steer_b must be positive (and below T0 = model.end_time), got {self.steer_b!r}")


@dataclass
class PartsConfig:
    """Training a flow by gradient-isolated parts (003; fastcnf.training.parts).

    Give the part boundaries with exactly one of ``boundaries`` / ``level_boundaries``.

    Attributes:
        enabled: train by parts.
        boundaries: indices into ``flow.steps`` where parts 2, 3, ... start (strictly increasing,
            each in 1..len(flow.steps)-1); any flow (Glow, multiscale, a stack of CNF blocks).
        level_boundaries: multiscale flows with levels (Glow): positions in 003's notation, levels
            counted from 1: ``2`` = the start of level 2 ("by blocks"), ``1.5`` = the middle flow
            step of level 1 ("across blocks", 003's 1_{1/2}).
        mechanism: ``alternate`` (parts take turns of ``turn`` units, 003's stable mechanism) or
            ``sequential`` (the parts phase split in equal consecutive budgets, one per part).
        turn: ``alternate``: length of one part's turn, in ``unit``.
        finetune: end-to-end fine-tuning at the end of training, in ``unit`` (003: 30 epochs);
            the parts phase is the first ``train.iterations`` minus this.
        unit: ``iterations`` or ``epochs`` (for ``turn`` and ``finetune``).
        lr_scales: per-part learning-rate factors on the scheduled rate (empty: all 1).
    """

    enabled: bool = False
    boundaries: list[int] = field(default_factory=list)
    level_boundaries: list[float] = field(default_factory=list)
    mechanism: str = "alternate"
    turn: int = 1
    finetune: int = 0
    unit: str = "iterations"
    lr_scales: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        from fastcnf.training.parts import check_parts_config  # the rules live with the feature

        check_parts_config(self)


@dataclass
class DistributedConfig:
    """Data-parallel training under torchrun (fastcnf.training.distributed).

    Launch with ``torchrun --nproc_per_node N -m fastcnf train RECIPE --out DIR``; without
    torchrun's variables training runs in one process. ``train.batch_size`` is the global batch.

    Attributes:
        backend: auto (nccl on GPU, gloo on CPU), gloo or nccl.
        timeout_minutes: collective timeout (rank 0 evaluates alone while the others wait).
        broadcast_buffers: after each step copy buffers and the parameters the main optimiser
            does not own (stepped by hooks) from rank 0, so every rank holds the same model.
        check_every: every this many steps verify that all ranks hold identical parameters and
            stop with an error otherwise (0: never).
    """

    backend: str = "auto"
    timeout_minutes: int = 60
    broadcast_buffers: bool = True
    check_every: int = 0


@dataclass
class LatentODEConfig:
    """LatentODE on the bi-directional spirals (002 §4.6, App. E; ``task: latent_ode``,
    fastcnf.models.latent_ode and fastcnf.training.latent_ode_task).

    Attributes:
        latent_dim: dimension of the initial latent state z_t0 (002: 5).
        supervised_dim: size of the supervised code z_y (the first coordinates of z_t0) conditioned
            on y = (a, b, direction) by a linear q_phi and predicting y by a linear q_theta
            (002: 3); 0 = plain LatentODE (no partition).
        rnn_hidden: hidden units of the time-reversed recognition RNN (002: 25).
        dynamics_hidden: hidden units of the one-hidden-layer dynamics MLP (002: 20).
        decoder_hidden: hidden units of the one-hidden-layer decoder MLP (002: 20).
        obs_std: standard deviation of the Gaussian observation likelihood (the data's noise, 0.3).
        supervised_weight: weight of q_theta's label loss added to the negative ELBO.
        probe_examples: training sequences used to fit the logistic-regression probe of the
            direction on the posterior mean of z_t0 (reported for both models).
        n_figure: test spirals drawn in the trajectory figure.
        time_stride: use every ``time_stride``-th time step of each sequence (observed window and
            extrapolation horizon alike); 1 = all 200 + 100 steps of 002, larger values make the
            recognition RNN and the dense ODE output cheaper on a CPU.
    """

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


@dataclass
class Config:
    """A whole run.

    Attributes:
        recipe: the recipe this configuration came from.
        description: one line shown by ``fastcnf recipes``.
        seed: seed of initialisation, data order and noise.
        device: cpu, cuda, cuda:N.
        dtype: float32 or float64.
        threads: torch threads on CPU (0: torch's default).
        task: density (flows) or another registered task (fastcnf.training.tasks.TASKS).
    """

    recipe: str = ""
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    task: str = "density"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    tolerances: TolerancesConfig = field(default_factory=TolerancesConfig)
    endtime: EndTimeConfig = field(default_factory=EndTimeConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    latent_ode: LatentODEConfig = field(default_factory=LatentODEConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------

def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_error(key: str, cls, prefix: str) -> ConfigError:
    valid = _valid_keys(cls, prefix)
    close = difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown configuration key {prefix + key!r}{hint} (valid keys: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"bad value for {key!r}: {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key!r} expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key!r} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key!r} expects a string, got {value!r}")
        return str(value)
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key_error(key, cls, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid {prefix.rstrip('.') or 'configuration'}: {e}") from None


def config_from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> None:
    """Cross-field checks with clear messages."""
    choices = {
        "model.arch": (cfg.model.arch, ("mlp", "multiscale", "glow")),
        "model.divergence": (cfg.model.divergence, ("exact", "hutchinson")),
        "model.noise": (cfg.model.noise, ("gaussian", "rademacher")),
        "model.exact_mode": (cfg.model.exact_mode, ("auto", "loop", "vmap")),
        "model.regularizer_reduction": (cfg.model.regularizer_reduction, ("auto", "sum", "mean")),
        "train.optimizer": (cfg.train.optimizer, ("adam", "adamw")),
        "train.schedule": (cfg.train.schedule, ("constant", "step", "cosine")),
        "train.decay_unit": (cfg.train.decay_unit, ("iterations", "epochs")),
        "dtype": (cfg.dtype, ("float32", "float64")),
    }
    for key, (value, accepted) in choices.items():
        if value not in accepted:
            close = difflib.get_close_matches(str(value), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not valid{hint}; accepted: {', '.join(accepted)}")
    positive = {
        "train.iterations": cfg.train.iterations, "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr, "model.end_time": cfg.model.end_time, "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    for key in ("atol", "rtol"):
        v = getattr(cfg.eval, key)
        if not 0 < v < 1:
            raise ConfigError(f"eval.{key} must be in (0, 1), got {v!r}")
    if cfg.model.hidden_dims and min(cfg.model.hidden_dims) <= 0:
        raise ConfigError(f"model.hidden_dims must be positive, got {cfg.model.hidden_dims}")


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed value for {key!r}: {text!r}") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` strings (dotted keys) to a nested mapping, validating the keys."""
    valid = set(_valid_keys(Config))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown configuration key {key!r}{hint} (see `fastcnf train RECIPE --show`)")
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text, key)
    return values


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

RECIPE_DIR = Path(str(resources.files("fastcnf") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description."""
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        out[path.stem] = str(data.get("description", "")).strip()
    return out


def recipe_dict(name: str) -> dict:
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.exists():
        names = list(list_recipes())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; available: {', '.join(names)}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    base = data.pop("base", None)
    if base is not None:
        merged = recipe_dict(base)
        _deep_update(merged, data)
        data = merged
    data["recipe"] = name
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_recipe(name: str, overrides: list[str] | None = None) -> Config:
    """The recipe ``name`` with ``KEY=VALUE`` overrides applied, validated."""
    values = recipe_dict(name)
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> Config:
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)

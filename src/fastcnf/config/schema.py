"""The configuration of a run: the core sections (data, solver, model, training, evaluation,
distributed, LatentODE) and :class:`Config`, which holds them. The methods' sections live in their
own packages; :func:`extend_config` adds them (:mod:`fastcnf.methods` builds the run's class).

Choices are ``Literal`` types, checked (with a "did you mean") when a section is built, whether
from a recipe or in Python; ranges are checked by each section's ``check``. Nothing here imports
from the rest of fastcnf: every layer reads its settings from these classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

from fastcnf.config.errors import ConfigError, check_tolerance
from fastcnf.config.features import DistributedConfig, LatentODEConfig
from fastcnf.config.section import ADAPTIVE_METHODS, SOLVER_METHODS, Section, SolverMethod

__all__ = [
    "ADAPTIVE_METHODS", "SOLVER_METHODS", "Section", "DataConfig", "SolverConfig", "ModelConfig", "TrainConfig", "EvalConfig",
    "GlowConfig", "UNetConfig", "DistributedConfig", "LatentODEConfig", "Config", "extend_config",
]

@dataclass
class DataConfig(Section):
    """Which data set to load and how much of it.

    Attributes:
        name: one of ``fastcnf.data.DATASETS`` (e.g. ``8gaussians``, ``digits``, ``mnist-test-split``).
        root: directory holding the image files (``mnist``, ``fmnist``, ``mnist-test-split``,
            ``cifar10``); ignored by the synthetic sets and ``digits``. ``~`` is expanded.
        n_train: synthetic sets: size of the fixed training draw; image sets: keep only the first
            ``n_train`` training images. 0: the data set's default (20,000 draws / every image).
        n_test: the same for the test split.
        train_fraction: fraction used for training where the split is ours (``digits``: 0.8 of a
            fixed permutation; ``mnist-test-split``: 0.9 in file order); None: that set's default.
        hflip: flip each training image left-right with probability 1/2 (InfoCNF §4.1 on CIFAR-10);
            images only, test batches are never flipped.
        path: ``table``: a ``.npy`` / ``.npz`` / ``.csv`` / ``.tsv`` / ``.txt`` file (rows = examples);
            ``image_folder``: a folder of PNG / JPEG images (sub-folders = class labels).
        test_path, val_path: optional held-out files in the same format (else seeded splits).
        key: the array of an ``.npz`` file holding several.
        columns: feature columns, by header name or 0-based index (None: all but the label column).
        label_column: the column of class labels (name or index; integers 0, 1, ... or class names), or None.
        test_fraction: share of the rows held out for testing when no ``test_path`` is given.
        val_fraction: share of the training split held out for validation, in [0, 1) (seeded by the
            run's seed; never taken from the test split; tables: of the rows left after the test
            split); synthetic sets draw a validation sample of that share of ``n_train`` instead.
            0: no validation split.
        standardize: tables: train on ``(x - mean) / std`` of the training split (``true``), or
            ``whiten``: also decorrelated with the Cholesky factor of the training split's
            covariance (the best single Gaussian becomes the standard normal); log-densities, scores
            and samples stay in the data's own units (with the map's log-Jacobian).
        drop_nonfinite: drop the rows holding NaN or inf instead of refusing the file.
    """

    _key = "data"
    name: str = "8gaussians"
    root: str | None = None
    n_train: int = 0
    n_test: int = 0
    train_fraction: float | None = None
    hflip: bool = False
    path: str | None = None
    test_path: str | None = None
    val_path: str | None = None
    key: str | None = None
    columns: list | None = None
    label_column: str | int | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    standardize: bool | str = True
    drop_nonfinite: bool = False

    def check(self) -> None:
        if isinstance(self.standardize, str) and self.standardize != "whiten":
            raise ConfigError(f"data.standardize must be true, false or whiten, got {self.standardize!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for a in ("n_train", "n_test"):
            v = getattr(self, a)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"data.{a} must be an integer >= 0 (0 = default), got {v!r}")
        if self.train_fraction is not None and not 0.0 < self.train_fraction < 1.0:
            raise ConfigError(f"data.train_fraction must be in (0, 1), got {self.train_fraction!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")


#: the methods of the lean solvers (``fastcnf.ode.fast_solvers.LEAN_METHODS``; tests/ode/test_recompute.py)
_LEAN_METHODS = ("dopri5", "bosh3")


@dataclass
class SolverConfig(Section):
    """How a block integrates its ODE.

    Attributes:
        method: torchdiffeq method; adaptive (dopri5, bosh3, adaptive_heun, dopri8) or fixed
            (rk4, euler, midpoint, heun: Heun's second-order method, torchdiffeq's ``heun2``).
        atol, rtol: error tolerances of adaptive methods (forward solve) in training.
        gradient: how a training solve's gradient is computed. ``auto`` (default) picks per block
            the fastest path whose gradient is exact for the discretised solve -- the fused toy solve
            (a concat-squash MLP with its own exact trace and no regulariser states: one autograd node
            with a hand-written discrete adjoint), direct back-propagation through the solver, or
            per-stage recomputation -- within ``memory_budget``, and the adjoint only when none fits
            (:func:`fastcnf.ode.solve.gradient_path`; the estimate is documented there). ``direct``:
            back-propagation through the solver's graph (every evaluation's activations kept).
            ``recompute``: direct back-propagation through the lean solver (``backend=fastcnf``,
            dopri5 or bosh3) by per-stage recomputation: the forward solve records nothing and keeps
            every accepted step's start state and stage derivatives; the backward pass re-evaluates
            one stage at a time (the discrete adjoint of the Runge-Kutta steps taken; Gholami et al.
            2019, "ANODE"; Zhuang et al. 2020, "ACA"): the same gradient with about one evaluation's
            graph in memory, for one more evaluation per accepted step. ``adjoint``: the continuous
            adjoint (Chen et al. 2018, "Neural Ordinary Differential Equations"; FFJORD's choice):
            O(1) memory, a gradient exact only up to the backward solve's tolerance.
        memory_budget: GiB a block's gradient path may hold (``auto``); 0 (default): a share
            (``fastcnf.ode.solve.BUDGET_SHARE``) of the memory free at planning time -- RAM on a CPU,
            device memory on a GPU.
        adjoint_atol, adjoint_rtol: tolerances of the backward (adjoint) solve; None: the forward ones.
        step_size: step of fixed-step methods (fraction of the block's rescaled interval [0, 1]).
        max_nfe: cap on function evaluations per solve; exceeding it raises
            ``SolverBudgetExceeded``. 0 disables the cap.
        backend: ``fastcnf`` integrates dopri5 and bosh3 with the lean solvers (same steps and
            solutions as torchdiffeq, faster) unless the adjoint is used; ``torchdiffeq`` always
            uses torchdiffeq.
        backward_precision: ``float32`` (default: the state's own precision) or ``bfloat16``: the
            precision of per-stage recomputation's backward re-evaluations (autocast: convolutions
            and matrix products in bfloat16, cotangents and gradients accumulated in the state's
            precision); with ``gradient=auto`` it makes recomputation the path. The forward solve,
            its error control, NFE and the likelihood are untouched; the gradient carries bfloat16
            rounding (Micikevicius et al. 2018, "Mixed Precision Training"). Honoured only where the
            hardware computes bfloat16 natively (a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or
            AMX); elsewhere (emulated, several times slower) one line says so and the run keeps
            float32 (``metrics.json``: ``backward_precision``).
    """

    _key = "solver"
    method: SolverMethod = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    gradient: Literal["auto", "direct", "adjoint", "recompute"] = "auto"
    memory_budget: float = 0.0
    adjoint_atol: float | None = None
    adjoint_rtol: float | None = None
    step_size: float = 0.05
    max_nfe: int = 10000
    backend: Literal["fastcnf", "torchdiffeq"] = "fastcnf"
    backward_precision: Literal["float32", "bfloat16"] = "float32"

    def check(self) -> None:
        for a in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            check_tolerance(getattr(self, a), f"solver.{a}", allow_none=True)
        if self.gradient == "recompute" and (self.backend != "fastcnf" or self.method not in _LEAN_METHODS):
            raise ConfigError(f"solver.gradient=recompute needs solver.backend=fastcnf and solver.method in "
                              f"{', '.join(_LEAN_METHODS)} (got {self.backend}, {self.method})")
        if self.backward_precision != "float32" and self.gradient not in ("auto", "recompute"):
            raise ConfigError(f"solver.backward_precision={self.backward_precision} needs solver.gradient=recompute "
                              "or auto (per-stage recomputation is the only backward pass that re-evaluates the "
                              "dynamics without error control)")
        if self.backward_precision != "float32" and self.gradient == "auto" and \
                (self.backend != "fastcnf" or self.method not in _LEAN_METHODS):
            raise ConfigError(f"solver.backward_precision={self.backward_precision} needs per-stage recomputation: "
                              f"solver.backend=fastcnf and solver.method in {', '.join(_LEAN_METHODS)}")
        if isinstance(self.memory_budget, bool) or float(self.memory_budget) < 0:
            raise ConfigError(f"solver.memory_budget must be a number of GiB >= 0 (0: automatic), got "
                              f"{self.memory_budget!r}")
        if not 0.0 < float(self.step_size) <= 1.0:
            raise ConfigError(f"solver.step_size must be in (0, 1], got {self.step_size!r}")
        if int(self.max_nfe) < 0:
            raise ConfigError(f"solver.max_nfe must be >= 0, got {self.max_nfe!r}")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def with_tolerance(self, atol: float, rtol: float | None = None) -> "SolverConfig":
        """A copy with other forward tolerances (the adjoint ones follow unless set explicitly)."""
        return replace(self, atol=float(atol), rtol=float(atol if rtol is None else rtol))


@dataclass
class GlowConfig(Section):
    """``model.arch: glow`` (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1
    Convolutions").

    Attributes:
        levels, steps: levels L and flow steps K per level.
        hidden: hidden channels of the affine couplings.
        lu: LU-parametrised 1x1 convolutions.
        preprocess: ``shift`` (x - 0.5, Glow) or ``logit`` (with ``model.logit_alpha``).
    """

    _key = "model.glow"
    levels: int = 3
    steps: int = 32
    hidden: int = 512
    lu: bool = True
    preprocess: Literal["shift", "logit"] = "shift"

    def check(self) -> None:
        self._positive("levels", "steps", "hidden")


@dataclass
class UNetConfig(Section):
    """``model.arch: unet``: one CNF block whose dynamics is a U-Net over the whole image.

    Attributes:
        channels: channels of the first resolution level.
        levels: resolution levels (down-samplings).
    """

    _key = "model.unet"
    channels: int = 32
    levels: int = 2

    def check(self) -> None:
        self._positive("channels", "levels")


@dataclass
class ModelConfig(Section):
    """The model.

    Attributes:
        arch: ``mlp`` (CNF blocks on vectors), ``multiscale`` (FFJORD's image architecture), ``glow``
            or ``unet`` (one CNF block whose dynamics is a U-Net over the whole image, after
            centring x - 0.5; the image architecture of flow matching).
        hidden_dims: hidden widths of each dynamics network (FFJORD: 64-64-64).
        min_width_per_dim: vector data: every hidden width is at least this many times the data's
            dimension (``max(h, k * D)``), so one recipe fits a 6-column and a 64-column table
            without widening the small one; 0: ``hidden_dims`` as given.
        layer_type: how time enters the dynamics network: ``concatsquash`` (``(W x + b) *
            sigmoid(G t + g) + H t``, FFJORD's toy model) or ``concat`` (t as an extra input
            feature / channel, FFJORD's multiscale image model, ``--layer_type concat``).
        activation: tanh, softplus, relu, elu or swish (FFJORD toy: tanh; images: softplus).
        num_blocks: ``mlp``: stacked CNF blocks; ``multiscale``: blocks before and after each squeeze.
        n_scales: multiscale scales (0: FFJORD's automatic choice).
        divergence: ``exact`` or ``hutchinson``.
        exact_mode: exact trace implementation: auto (network forward-mode trace when available), loop, vmap.
        noise: Hutchinson noise: gaussian or rademacher.
        hutchinson_mode: how the Hutchinson estimate ``e^T (df/dz) e`` is formed: ``vjp`` (reverse mode,
            FFJORD) or ``jvp`` (forward mode: back-propagating through it needs first derivatives only).
        end_time: T0 of every block (FFJORD toy 0.5, images 1.0).
        logit_alpha: alpha of the logit transform at the input of image models.
        kinetic_weight: weight of the kinetic-energy regulariser (Finlay et al. 2020; 0: off).
        jacobian_weight: weight of the Jacobian-Frobenius regulariser (Finlay et al. 2020; 0: off).
        regularizer_reduction: ``sum`` of the regulariser rates over dimensions (Finlay et al. 2020,
            eq. 3-4), their ``mean`` (the paper's released code; matches a bits/dim loss), or
            ``auto`` (mean on image data, sum otherwise), so one weight means the same everywhere.
        glow: options of ``arch: glow`` (:class:`GlowConfig`).
        unet: options of ``arch: unet`` (:class:`UNetConfig`).
    """

    _key = "model"
    arch: Literal["mlp", "multiscale", "glow", "unet"] = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    min_width_per_dim: int = 0
    layer_type: Literal["concatsquash", "concat"] = "concatsquash"
    activation: Literal["tanh", "softplus", "relu", "elu", "swish"] = "tanh"
    num_blocks: int = 1
    n_scales: int = 0
    divergence: Literal["exact", "hutchinson"] = "exact"
    exact_mode: Literal["auto", "loop", "vmap"] = "auto"
    noise: Literal["gaussian", "rademacher"] = "gaussian"
    hutchinson_mode: Literal["vjp", "jvp"] = "vjp"
    end_time: float = 0.5
    logit_alpha: float = 1e-6
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    regularizer_reduction: Literal["auto", "sum", "mean"] = "auto"
    glow: GlowConfig = field(default_factory=lambda: GlowConfig())
    unet: UNetConfig = field(default_factory=lambda: UNetConfig())

    def check(self) -> None:
        self._positive("end_time", "num_blocks")
        if self.min_width_per_dim < 0:
            raise ConfigError(f"model.min_width_per_dim must be >= 0, got {self.min_width_per_dim}")
        if self.hidden_dims and min(self.hidden_dims) <= 0:
            raise ConfigError(f"model.hidden_dims must be positive, got {self.hidden_dims}")
        if self.kinetic_weight < 0 or self.jacobian_weight < 0:
            raise ConfigError("model.kinetic_weight and model.jacobian_weight must be >= 0")


@dataclass
class TrainConfig(Section):
    """The optimisation.

    Attributes:
        iterations: optimiser steps.
        batch_size: examples per step (the global batch under torchrun).
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
        val_every: compute the validation NLL every this many iterations and after the last one,
            keeping the weights with the best (lowest) one: the run ends with them, and they are
            the weights tested and exported (0: no validation, the final weights are kept, as the
            papers train a fixed number of iterations). Needs a validation split
            (``data.val_fraction``); evaluated as the test split is (``eval.atol``, ``eval.seed``,
            at most ``eval.max_examples`` examples).
        patience: stop after this many validations in a row without a lower validation NLL
            (early stopping, as MAF and FFJORD train their tabular models; 0: never stop early).
        checkpoint_every: write a checkpoint every this many iterations (0: only at the end).
        checkpoint_minutes: also write one when this many minutes passed since the last one
            (whichever of the two comes first; 0: not by time), so a killed run loses little work.
        max_loss_spikes: optimiser steps with a non-finite loss or gradient that are skipped (no
            update, gradients zeroed; counted as ``skipped_steps``) before training stops as diverged.
        log_every: refresh the progress bar / print a log line every this many iterations.
        accumulation_steps: micro-batches per optimiser step on each process; the accumulated
            gradient equals the full-batch gradient.
        lr_scaling: none, linear or sqrt: the rate used is ``lr * (batch_size /
            reference_batch_size)`` (linear) or its square root (Goyal et al. 2017).
        reference_batch_size: the batch ``lr`` was tuned for (0: ``batch_size``, no scaling).
        objective: ``likelihood`` (maximum likelihood through the ODE solves, FFJORD) or an
            objective a method provides (README, "Methods"; e.g. ``flow_matching``, regression
            onto a path's velocity).
        ema_decay: keep an exponential moving average of the weights with this decay (bias-corrected,
            :mod:`fastcnf.training.ema`) and validate, test, sample and export it instead of the last
            weights (0: off).
    """

    _key = "train"
    iterations: int = 1000
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_iterations: int = 0
    decay_at: list[int] = field(default_factory=list)
    decay_unit: Literal["iterations", "epochs"] = "iterations"
    decay_factor: float = 0.1
    min_lr: float = 0.0
    grad_clip: float = 0.0
    eval_every: int = 0
    val_every: int = 0
    patience: int = 0
    checkpoint_every: int = 200
    checkpoint_minutes: float = 5.0
    max_loss_spikes: int = 0
    log_every: int = 10
    accumulation_steps: int = 1
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: int = 0
    objective: str = "likelihood"
    ema_decay: float = 0.0

    def check(self) -> None:
        self._positive("iterations", "batch_size", "lr", "accumulation_steps")
        if isinstance(self.ema_decay, bool) or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no weight average), got {self.ema_decay!r}")
        if self.reference_batch_size < 0:
            raise ConfigError(f"train.reference_batch_size must be >= 0 (0: train.batch_size), "
                              f"got {self.reference_batch_size}")
        if self.val_every < 0 or self.patience < 0:
            raise ConfigError(f"train.val_every and train.patience must be >= 0 (0: off), "
                              f"got {self.val_every} and {self.patience}")
        if self.patience > 0 and self.val_every == 0:
            raise ConfigError(f"train.patience={self.patience} counts validations: set train.val_every too")
        if not self.checkpoint_minutes >= 0 or self.max_loss_spikes < 0:
            raise ConfigError(f"train.checkpoint_minutes and train.max_loss_spikes must be >= 0, got "
                              f"{self.checkpoint_minutes!r} and {self.max_loss_spikes!r}")


@dataclass
class EvalConfig(Section):
    """Evaluation on the test split.

    Attributes:
        atol, rtol: solver tolerances at evaluation (Nguyen et al. 2019, InfoCNF §4.2: 1e-5).
        batch_size: evaluation batch size.
        max_examples: evaluate on at most this many test examples (0: all).
        n_samples: samples drawn for the figures (density, sample and class-conditional figures).
        seed: seed of evaluation noise (dequantisation, Hutchinson), so evaluations are repeatable.
        figures: write the figures at the end of training (density maps and samples cost solves).
        probes: independent Hutchinson probes per test example (models with a Hutchinson
            estimator; the log-density is their mean and metrics.json reports the standard error).
        sample_accuracy_per_class: class-conditional models: samples drawn per label for
            ``sample_accuracy`` (the share a logistic regression fitted on the training split
            assigns to their label; 0: not computed).
        max_seconds: wall-time cap, in seconds, on one evaluation (all its batches and solves;
            also sampling, scoring and ``--integrate``), besides each solve's ``solver.max_nfe``;
            0: no cap. Raise it for large test sets on a CPU.
    """

    _key = "eval"
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 1000
    max_examples: int = 0
    n_samples: int = 64
    seed: int = 1234
    figures: bool = True
    probes: int = 1
    sample_accuracy_per_class: int = 100
    max_seconds: float = 3600.0

    def check(self) -> None:
        check_tolerance(self.atol, "eval.atol")
        check_tolerance(self.rtol, "eval.rtol")
        self._positive("batch_size", "n_samples", "probes")
        if self.max_examples < 0 or self.sample_accuracy_per_class < 0:
            raise ConfigError("eval.max_examples and eval.sample_accuracy_per_class must be >= 0")
        if not self.max_seconds >= 0:
            raise ConfigError(f"eval.max_seconds must be >= 0 (0: no cap), got {self.max_seconds!r}")


@dataclass
class Config(Section):
    """A whole run: the core sections. The run's configuration class adds one section per method
    (:func:`extend_config`; ``fastcnf.methods.Config``).

    Attributes:
        recipe: the recipe this configuration came from.
        description: one line shown by ``fastcnf recipes``.
        seed: seed of initialisation, data order and noise.
        device: cpu, cuda, cuda:N.
        dtype: float32 or float64.
        threads: torch threads on CPU (0: torch's default).
        task: ``density`` (flows) or ``latent_ode``.
    """

    recipe: str = ""
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    threads: int = 0
    task: Literal["density", "latent_ode"] = "density"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    latent_ode: LatentODEConfig = field(default_factory=LatentODEConfig)


def extend_config(sections: dict[str, type], check: Callable[[Config], None]) -> type[Config]:
    """The configuration class of a run: :class:`Config` plus one section per entry of ``sections``
    (key -> section dataclass, default-constructed), with ``check(cfg)`` run after every section
    has checked itself (rules across sections)."""
    def check_all(self) -> None:
        Config.check(self)
        check(self)

    fields = [(key, cls, field(default_factory=cls)) for key, cls in sections.items()]
    return dataclasses.make_dataclass("Config", fields, bases=(Config,), namespace={"check": check_all})

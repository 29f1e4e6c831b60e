"""Configuration sections of the optional features: conditioning, solver-tolerance policies, end
times, training by parts, data-parallel training, LatentODE and flow matching."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastcnf.config.errors import ConfigError, check_tolerance
from fastcnf.config.section import EndTimePolicyName, Section, TolerancePolicyName

__all__ = ["ConditioningConfig", "TolerancesConfig", "EndTimeConfig", "PartsConfig", "DistributedConfig",
           "LatentODEConfig", "FlowMatchingConfig"]


@dataclass
class ConditioningConfig(Section):
    """Class conditioning: CCNF and InfoCNF (Nguyen et al. 2019, "InfoCNF: Efficient Conditional
    Continuous Normalizing Flow Using Adaptive Solvers", §2).

    Attributes:
        kind: none, ccnf (class-conditional Gaussian on the whole latent z, eq. 3) or infocnf
            (on the supervised code z_y only, ``supervised_fraction`` of the latent placed by
            ``placement``; the rest of z is N(0, I); §2.2).
        beta: weight of the classifier's cross-entropy in the loss (eq. 4).
        supervised_fraction: infocnf: the size of z_y as a fraction of the whole latent z (§4.1:
            "half of the latent code", 0.5), or of the final piece with ``placement: final_piece``.
        placement: infocnf: where z_y lies in the flat latent (factored pieces first, final output
            last): ``first`` (``z = [z_y, z_u]``, §2.2), ``last`` (the end of z: the final output and
            the latest factored pieces) or ``final_piece`` (the start of the final output only;
            fastcnf before issue 17, for old runs).
        dropout: dropout rate on the linear classifier's input during training (§4.1: 0.5).
        learn_scale: learn log sigma(y) as well as mu(y); false fixes sigma = 1.
        label_prior: p(y) of the marginal likelihood and of unlabelled sampling: uniform or
            empirical (the training split's label frequencies).
    """

    _key = "conditioning"
    kind: Literal["none", "ccnf", "infocnf"] = "none"
    beta: float = 1.0
    supervised_fraction: float = 0.5
    placement: Literal["first", "last", "final_piece"] = "first"
    dropout: float = 0.5
    learn_scale: bool = True
    label_prior: Literal["uniform", "empirical"] = "uniform"

    def check(self) -> None:
        if not 0.0 < self.supervised_fraction <= 1.0:
            raise ConfigError(f"conditioning.supervised_fraction must be in (0, 1], got {self.supervised_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"conditioning.dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ConfigError(f"conditioning.beta must be >= 0, got {self.beta}")


@dataclass
class TolerancesConfig(Section):
    """Solver-tolerance policy (Nguyen et al. 2019, InfoCNF §3).

    ``fixed`` solves every block at ``solver.atol``/``rtol`` (and ``solver.adjoint_*``).
    ``per_block`` takes lists, one value per CNF block in forward order (``model.cnf_blocks()``);
    a single value applies to every block. ``learned`` samples each block's tolerance per batch
    from a gating network trained by REINFORCE.

    Attributes:
        policy: fixed, per_block or learned.
        atol, rtol: per_block: forward tolerances (rtol empty: equal to atol).
        layout: per_block: ``blocks`` (one value per CNF block, forward order, or one for all) or
            ``stacks`` (two values: the first CNF block of each scale's stack, then every other
            block; Mixed Conditional FFJORD §3: "the first CNF in each stacked CNF ... cannot
            tolerate a lot of error"). The adjoint lists follow the same layout.
        adjoint_atol, adjoint_rtol: per_block or learned: adjoint tolerances per block (empty:
            ``solver.adjoint_*``, else the forward tolerance).
        init_tol: learned: initial gate mean tolerance (0: solver.atol).
        init_std: learned: initial std of the Gaussian over log10(tolerance).
        min_std: learned: floor of that std (keeps exploring).
        min_tol, max_tol: learned: sampled tolerances are clamped to [min_tol, max_tol].
        gate_hidden: learned: width of each gate (MLP on vectors, small CNN on images).
        gate_lr: learned: Adam learning rate of the gates (their own optimiser).
        alpha: learned: weight of the reward -NFE against the loss (eq. 6).
        baseline_momentum: learned: momentum of the moving-average baseline of the returns.
        loss_baseline_momentum: learned: momentum of the baseline of the returns' loss part ``-L``
            (null: ``baseline_momentum``). Any value is an unbiased baseline (past steps only).
        include_loss: learned: the return includes -L (eq. 7); false: reward -NFE only.
        eval_tolerance: learned: evaluate at eval.atol/rtol (fixed; §4.2) or at each gate's mean
            tolerance (mean; Appendix D).
    """

    _key = "tolerances"
    policy: TolerancePolicyName = "fixed"
    atol: list[float] = field(default_factory=list)
    rtol: list[float] = field(default_factory=list)
    layout: Literal["blocks", "stacks"] = "blocks"
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
    eval_tolerance: Literal["fixed", "mean"] = "fixed"

    def check(self) -> None:
        for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            for i, v in enumerate(getattr(self, key)):
                check_tolerance(v, f"tolerances.{key}[{i}]")
        if self.init_tol != 0.0:
            check_tolerance(self.init_tol, "tolerances.init_tol")
        check_tolerance(self.min_tol, "tolerances.min_tol")
        check_tolerance(self.max_tol, "tolerances.max_tol")
        if not self.min_tol < self.max_tol:
            raise ConfigError(f"tolerances.min_tol={self.min_tol} must be below tolerances.max_tol={self.max_tol}")
        if not self.init_std > self.min_std > 0:
            raise ConfigError(f"tolerances.init_std ({self.init_std}) must exceed tolerances.min_std ({self.min_std}) > 0")
        for key in ("baseline_momentum", "loss_baseline_momentum"):
            m = getattr(self, key)
            if m is not None and not 0.0 <= m < 1.0:
                raise ConfigError(f"tolerances.{key}={m} must be in [0, 1)")
        if self.alpha < 0:
            raise ConfigError(f"tolerances.alpha must be >= 0, got {self.alpha}")
        self._positive("gate_lr", "gate_hidden")
        if self.policy == "fixed" and (self.atol or self.rtol):
            raise ConfigError("tolerances.atol/rtol are per-block lists (tolerances.policy=per_block); "
                              "the fixed policy uses solver.atol and solver.rtol")
        if self.layout == "stacks":
            for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
                n = len(getattr(self, key))
                if n not in (0, 2) or (key == "atol" and n != 2):
                    raise ConfigError(f"tolerances.layout=stacks takes two values in tolerances.{key} (the first "
                                      f"block of each stack, then the others), got {list(getattr(self, key))}")
        if self.policy == "per_block" and not self.atol:
            raise ConfigError("tolerances.policy=per_block needs tolerances.atol, a list with one "
                              "tolerance per CNF block (forward order), e.g. [1e-3, 1e-5]")


@dataclass
class EndTimeConfig(Section):
    """End-time policy: TO-FLOW (Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows
    with Temporal Optimization adjoint with Moving Speed") and STEER (Ghosh et al. 2020).

    T0, the initial (toflow), fixed (fixed) or central (steer) end time of every block, is
    ``model.end_time`` (TO-FLOW §4: 0.5 on toy data, 1 on images).

    Attributes:
        policy: fixed (T = T0), joint (T an ordinary parameter of the main optimiser), toflow
            (TO-FLOW Algorithm 1: coordinate descent on T with its own Adam, temporal
            regularisation, clipping) or steer (T ~ U[T0 - b, T0 + b] in training, T0 at evaluation).
        lr: toflow: learning rate of T's own Adam (TO-FLOW §4: 1e-2); not scaled by the schedule.
        alpha: toflow: weight of the temporal regulariser alpha * |T| (eq. 15-16: 0.1).
        clip_eps: toflow: eps of the clipping T in [eps, 2 T0 - eps] (eq. 17: 0.1); 0 < eps < T0.
        steer_b: steer: half-width b of the uniform end-time interval; 0 < b < T0.
        order: toflow: ``algorithm1`` (TO-FLOW Algorithm 1: T steps after the weights' update, on
            eq. 12-13's gradient at this iteration's end states evaluated with the updated
            weights; one network evaluation per block, no extra solve) or ``simultaneous`` (T and
            the weights step on the gradients of one backward pass; fastcnf before issue 17).
    """

    _key = "endtime"
    policy: EndTimePolicyName = "fixed"
    lr: float = 1e-2
    alpha: float = 0.1
    clip_eps: float = 0.1
    steer_b: float = 0.25
    order: Literal["algorithm1", "simultaneous"] = "algorithm1"

    def check(self) -> None:
        self._positive("lr", "clip_eps", "steer_b")
        if not self.alpha >= 0:
            raise ConfigError(f"endtime.alpha must be >= 0, got {self.alpha!r}")


@dataclass
class PartsConfig(Section):
    """Training a flow by gradient-isolated parts (Bhatt & Inouye, "Learning Flows by Parts").

    Give the part boundaries with exactly one of ``boundaries`` / ``level_boundaries``.

    Attributes:
        enabled: train by parts.
        boundaries: indices into ``flow.steps`` where parts 2, 3, ... start (strictly increasing).
        level_boundaries: flows with levels (Glow): positions in the paper's notation, levels
            counted from 1: ``2`` = the start of level 2 ("by blocks"), ``1.5`` = the middle flow
            step of level 1 ("across blocks").
        mechanism: ``alternate`` (parts take turns of ``turn`` units, the paper's stable mechanism)
            or ``sequential`` (the parts phase split in equal consecutive budgets).
        turn: ``alternate``: length of one part's turn, in ``unit``.
        finetune: end-to-end fine-tuning at the end of training, in ``unit`` (the paper: 30 epochs).
        unit: ``iterations`` or ``epochs`` (for ``turn`` and ``finetune``).
        lr_scales: per-part learning-rate factors on the scheduled rate (empty: all 1).
    """

    _key = "parts"
    enabled: bool = False
    boundaries: list[int] = field(default_factory=list)
    level_boundaries: list[float] = field(default_factory=list)
    mechanism: Literal["alternate", "sequential"] = "alternate"
    turn: int = 1
    finetune: int = 0
    unit: Literal["iterations", "epochs"] = "iterations"
    lr_scales: list[float] = field(default_factory=list)

    def check(self) -> None:
        if self.turn < 1:
            raise ConfigError(f"parts.turn must be >= 1, got {self.turn}")
        if self.finetune < 0:
            raise ConfigError(f"parts.finetune must be >= 0, got {self.finetune}")
        if any(not (s > 0 and s != float("inf")) for s in self.lr_scales):
            raise ConfigError(f"parts.lr_scales must be positive numbers, got {list(self.lr_scales)}")
        if self.boundaries and self.level_boundaries:
            raise ConfigError("give the part boundaries once: parts.boundaries (indices into flow.steps) or "
                              "parts.level_boundaries (levels, the paper's notation), not both")
        for key in ("boundaries", "level_boundaries"):
            b = list(getattr(self, key))
            if any(later <= earlier for earlier, later in zip(b, b[1:])):
                raise ConfigError(f"parts.{key}={b} must be strictly increasing: parts are contiguous and "
                                  "may neither overlap nor be empty")
        if self.enabled and not (self.boundaries or self.level_boundaries):
            raise ConfigError("parts.enabled=true needs at least one boundary: set parts.boundaries (indices "
                              "into flow.steps, e.g. [4]) or parts.level_boundaries (e.g. [1.5] or [2, 3])")


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


@dataclass
class FlowMatchingConfig(Section):
    """Flow matching (``train.objective: flow_matching``): the CNF's network regresses onto the
    velocity of a probability path between data (t = 0) and the prior (t = 1) (Lipman et al. 2023,
    "Flow Matching for Generative Modeling"; Tong et al. 2024, "Improving and generalizing
    flow-based generative models with minibatch optimal transport"). No ODE is solved in training;
    the trained model is an ordinary CNF, evaluated by exact or Hutchinson likelihood like any other.

    Attributes:
        path: ``cfm`` (independent conditional flow matching: straight paths with constant
            ``sigma``) or ``ot`` (Lipman et al.'s optimal-transport path with ``sigma_min``).
        sigma: cfm: standard deviation of the Gaussian around each straight path.
        sigma_min: ot: width of the path's end at the data.
        coupling: ``independent`` pairs, ``exact`` minibatch optimal transport (Hungarian
            algorithm on squared distances) or ``sinkhorn`` (entropic OT; needs the POT package).
        sinkhorn_reg: sinkhorn: entropic regularisation, relative to the mean squared cost.
        sinkhorn_solver: sinkhorn: ``pot`` (POT's ``ot.sinkhorn``, on the CPU) or ``torch`` (fastcnf's
            log-domain iteration on the batch's device, no POT needed).
        ot_batch_size: exact / sinkhorn: pair within consecutive groups of this many examples of
            the batch (0: the whole batch); a batch of 1024 with groups of 256 costs four 256x256
            assignments instead of one 1024x1024 (Tong et al. 2024 solve OT per minibatch).
        time_sampling: ``uniform`` on [0, 1] or ``logit_normal``.
        class_separation: class-conditional runs (``conditioning.kind: ccnf``): norm of each class's
            fixed source mean (random directions, one per class); the source of class y is
            N(mu_y, I) and labels are read back by Bayes' rule.
    """

    _key = "flow_matching"
    path: Literal["cfm", "ot"] = "cfm"
    sigma: float = 0.0
    sigma_min: float = 1e-4
    coupling: Literal["independent", "exact", "sinkhorn"] = "independent"
    sinkhorn_reg: float = 0.05
    sinkhorn_solver: Literal["pot", "torch"] = "pot"
    ot_batch_size: int = 0
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    class_separation: float = 4.0

    def check(self) -> None:
        if self.sigma < 0 or self.sigma_min < 0:
            raise ConfigError("flow_matching.sigma and flow_matching.sigma_min must be >= 0")
        self._positive("sinkhorn_reg", "class_separation")
        if isinstance(self.ot_batch_size, bool) or int(self.ot_batch_size) < 0:
            raise ConfigError(f"flow_matching.ot_batch_size must be an integer >= 0, got {self.ot_batch_size!r}")

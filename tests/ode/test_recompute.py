"""Direct back-propagation by per-stage recomputation (``solver.gradient=recompute``, fastcnf.ode.recompute).

The reference is direct back-propagation through the recorded lean solve (``gradient=direct``):
autograd differentiates every operation of every step, an independent route to the gradient of
the discrete solution. Recompute mode must give the same solution, forward NFE and gradients (initial
state, every parameter, the learned end time) on a nonlinear tuple ODE and on conv CNFs built as the
library builds them, with a backward NFE equal to the evaluations the backward pass makes again,
while keeping only states (no activations) across the forward solve and the graph of one
evaluation at a time in the backward pass.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from torch import nn

from fastcnf import build_model
from fastcnf.config import ConfigError
from fastcnf.methods import load_recipe
from fastcnf.config import schema
from fastcnf.data.base import DataBundle, DataSplit
from fastcnf.ode import NFECounter, SolverBudgetExceeded, SolverConfig, solve
from fastcnf.ode.fast_solvers import LEAN_METHODS, solve_adaptive

F64 = torch.float64


# ---- configuration -------------------------------------------------------------------------------

def test_recompute_with_the_adjoint_is_a_config_error():
    with pytest.raises(ConfigError, match=r"solver\.recompute.*solver\.adjoint=true"):
        load_recipe("digits-cnf", ["solver.recompute=true", "solver.adjoint=true"])
    with pytest.warns(FutureWarning, match="solver.recompute=true is deprecated: it became solver.gradient=recompute"):
        assert load_recipe("digits-cnf", ["solver.recompute=true"]).solver.gradient == "recompute"
    assert SolverConfig().gradient == "auto"


@pytest.mark.parametrize("kwargs", [dict(backend="torchdiffeq"), dict(method="rk4"), dict(method="dopri8")])
def test_recompute_outside_the_lean_solver_is_a_config_error(kwargs):
    with pytest.raises(ConfigError, match=r"solver\.gradient=recompute needs solver\.backend=fastcnf"):
        SolverConfig(gradient="recompute", **kwargs)


def test_the_config_knows_the_lean_methods():
    assert tuple(schema._LEAN_METHODS) == tuple(LEAN_METHODS)


# ---- a nonlinear ODE with a tuple state ----------------------------------------------------------

class _TupleODE(nn.Module):
    """``dx/dt = B tanh((1 + t) A x) + 0.1 sum(w)``, ``dw/dt = tanh(C x) * w``: nonlinear, time-dependent,
    components coupled both ways; counts its evaluations."""

    def __init__(self, dtype=F64) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 16), nn.Linear(16, 3), nn.Linear(3, 2)
        self.to(dtype)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        x, w = y
        h = torch.tanh(self.a(x) * (1 + t))
        return self.b(h) + 0.1 * w.sum(-1, keepdim=True), torch.tanh(self.c(x)) * w


def _tuple_run(recompute: bool, method: str, times, dtype=F64, tol=1e-7, loss_weights=None):
    torch.manual_seed(1)
    f = _TupleODE(dtype)
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 2, dtype=dtype, requires_grad=True)
    counter = NFECounter()
    t = torch.tensor(times, dtype=dtype)
    out = solve(f, (x, w), t, SolverConfig(method=method, atol=tol, rtol=tol, gradient="recompute" if recompute else "direct"), counter)
    forward_calls = f.calls
    # every output time enters the loss, with its own weight
    lw = torch.linspace(0.5, 1.5, len(times), dtype=dtype).view(-1, 1, 1)
    loss = (lw * out[0] ** 2).sum() + (lw * out[1] * torch.cos(out[1])).sum()
    grads = torch.autograd.grad(loss, [x, w, *f.parameters()])
    return dict(out=[o.detach() for o in out], grads=grads, forward=counter.forward, backward=counter.backward,
                forward_calls=forward_calls, backward_calls=f.calls - forward_calls)


def _accepted_steps(method: str, times, dtype=F64, tol=1e-7):
    """The accepted steps of the same solve, recorded by the solver (no gradients)."""
    torch.manual_seed(1)
    f = _TupleODE(dtype)
    y0 = (torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, dtype=dtype))
    steps: list = []
    with torch.no_grad():
        solve_adaptive(f, y0, times, LEAN_METHODS[method], tol, tol, record=steps)
    return steps


TIMES = {
    "one-output": [0.0, 1.3],
    "several-outputs": [0.0, 0.2, 0.7, 1.3],
    "backwards-in-time": [1.0, 0.5, -0.4],
}


@pytest.mark.parametrize("times", list(TIMES.values()), ids=list(TIMES))
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_recompute_equals_direct_backpropagation_on_a_nonlinear_ode(method, times):
    direct = _tuple_run(False, method, times)
    rec = _tuple_run(True, method, times)
    for a, b in zip(rec["out"], direct["out"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert rec["forward"] == direct["forward"] == direct["forward_calls"] == rec["forward_calls"]
    for a, b in zip(rec["grads"], direct["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # backward NFE = the evaluations made again: every accepted step's stages (the first one
    # included), plus the last stage of each step an output is interpolated in
    steps = _accepted_steps(method, times)
    taus = [-v for v in times] if times[-1] < times[0] else list(times)
    interpolated = {next(n for n, s in enumerate(steps) if s.tau1 >= tau) for tau in taus[1:]
                    if all(s.tau1 != tau for s in steps)}
    stages = len(LEAN_METHODS[method].alpha)
    assert rec["backward"] == rec["backward_calls"] == stages * len(steps) + len(interpolated)
    assert len(steps) > 3 and interpolated


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_an_output_at_a_step_end_is_that_steps_end_state(method):
    """The solver never shortens a step to an output time, so an output time taken from a recorded
    step's end is reached exactly there: that output is the step's end state, not interpolated."""
    steps = _accepted_steps(method, [0.0, 1.3])
    times = [0.0, steps[1].tau1, steps[3].tau1, 1.3]
    assert _accepted_steps(method, times)[3].tau1 == times[2]
    direct = _tuple_run(False, method, times)
    rec = _tuple_run(True, method, times)
    for a, b in zip(rec["grads"], direct["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    stages = len(LEAN_METHODS[method].alpha)
    assert rec["backward"] == stages * len(steps) + 1  # only the last output is interpolated


def test_recompute_in_float32_agrees_with_direct_backpropagation():
    direct = _tuple_run(False, "dopri5", [0.0, 0.6, 1.3], dtype=torch.float32, tol=1e-5)
    rec = _tuple_run(True, "dopri5", [0.0, 0.6, 1.3], dtype=torch.float32, tol=1e-5)
    assert rec["forward"] == direct["forward"]
    for a, b in zip(rec["out"], direct["out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(rec["grads"], direct["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Reparametrised(nn.Module):
    """Dynamics using a weight computed outside from a parameter (with saved tensors: softplus)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _TupleODE()
        self.raw = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=F64))
        self.gain = None

    def forward(self, t, y):
        dx, dw = self.inner(t, y)
        return dx * self.gain, dw


@pytest.mark.parametrize("which", ["leaf", "non-leaf"])
def test_gradient_reaches_what_the_state_and_the_given_parameters_depend_on(which):
    """The initial state is computed from a leaf upstream; the dynamics use a weight computed from a
    parameter before the solve; ``adjoint_params`` names the parameters differentiated (as for the
    adjoint), the leaf behind that weight or the weight itself: the others get no gradient."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        f = _Reparametrised()
        scale = torch.tensor(1.5, dtype=F64, requires_grad=True)
        x = torch.randn(4, 3, dtype=F64) * scale
        w = torch.randn(4, 2, dtype=F64)  # no gradient needed
        f.gain = nn.functional.softplus(f.raw)
        if which == "non-leaf":
            f.gain.retain_grad()
        params = (f.inner.a.weight, f.inner.b.bias, f.raw if which == "leaf" else f.gain)
        out = solve(f, (x, w), torch.tensor([0.0, 0.4, 1.0], dtype=F64),
                    SolverConfig(atol=1e-8, rtol=1e-8, gradient="recompute" if recompute else "direct"), NFECounter(), adjoint_params=params)
        # the weight also enters the loss outside the solve: its graph serves both
        (out[0][-1].pow(2).sum() + out[1].sum() + out[0][1].sum() * f.gain.sum()).backward()
        assert (f.inner.c.weight.grad is None) == recompute  # not in adjoint_params
        results.append((scale.grad, f.inner.a.weight.grad, f.inner.b.bias.grad, f.raw.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_recompute_keeps_the_nfe_cap_of_the_forward_solve():
    torch.manual_seed(1)
    f = _TupleODE()
    y0 = (torch.randn(4, 3, dtype=F64, requires_grad=True), torch.randn(4, 2, dtype=F64))
    cfg = SolverConfig(atol=1e-9, rtol=1e-9, gradient="recompute", max_nfe=20)
    with pytest.raises(SolverBudgetExceeded, match="blk: forward solve exceeded max_nfe=20"):
        solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64), cfg, NFECounter(), name="blk")


def test_recompute_refuses_what_it_cannot_differentiate():
    torch.manual_seed(1)
    f = _TupleODE()
    y0 = (torch.randn(4, 3, dtype=F64, requires_grad=True), torch.randn(4, 2, dtype=F64))
    cfg = SolverConfig(gradient="recompute")
    t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="solver.gradient=recompute does not differentiate through the time"):
        solve(f, y0, t, cfg, NFECounter())
    out = solve(f, y0, t.detach(), cfg, NFECounter())
    with pytest.raises(RuntimeError, match="create_graph=True.*solver.gradient=direct"):
        torch.autograd.grad(out[0].sum(), y0[0], create_graph=True)
    out = solve(f, y0, t.detach(), cfg, NFECounter())
    out[0].sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out[0].sum().backward()  # the step checkpoints were freed, as a recorded graph's buffers are


# ---- conv CNFs built by the library --------------------------------------------------------------

def _digits_bundle(n: int = 4) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return DataBundle(name="digits", train=DataSplit(x, torch.arange(n) % 10), test=DataSplit(x[:2], torch.arange(2)),
                      shape=(1, 8, 8), num_classes=10, levels=17, split="fake")


def _conv_model(overrides, dtype=F64, gain=3.0):
    """The multiscale model of ``mnist-ffjord``, small, on 8x8 digits; the dynamics' weights scaled by
    ``gain`` so that the solves take several steps and reject some (at initialisation they take 3)."""
    base = ["data.name=digits", "model.num_blocks=1", "model.hidden_dims=[8,8]", "solver.gradient=direct",
            "solver.atol=1e-4", "solver.rtol=1e-4"]
    cfg = load_recipe("mnist-ffjord", base + list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg, _digits_bundle()).to(dtype)
    with torch.no_grad():
        for b in model.cnf_blocks():
            for p in b.net.parameters():
                p.mul_(gain)
    calls = {b.name: [0] for b in model.cnf_blocks()}
    for b in model.cnf_blocks():
        b.net.register_forward_hook(lambda m, i, o, c=calls[b.name]: c.__setitem__(0, c[0] + 1))
    return model, calls


def _set_recompute(model, on: bool, precision: str = "float32") -> None:
    for b in model.cnf_blocks():
        b.solver = replace(b.solver, gradient="recompute" if on else "direct", backward_precision=precision)


def _conv_step(model, calls, recompute: bool, dtype=F64, precision: str = "float32"):
    """One training step's loss and gradients (x, every parameter), NFE and dynamics calls per block."""
    _set_recompute(model, recompute, precision)
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(5)
    x = ((torch.randint(0, 17, (3, 1, 8, 8), generator=g).to(dtype) + torch.rand(3, 1, 8, 8, generator=g, dtype=dtype))
         / 17).requires_grad_(True)
    torch.manual_seed(7)  # the Hutchinson noise of every block
    for c in calls.values():
        c[0] = 0
    loss = -model.log_prob(x).mean() / 64 + model.regularization_loss()
    fwd_calls = {k: c[0] for k, c in calls.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    nfe = {b.name: (b.nfe.forward, b.nfe.backward) for b in model.cnf_blocks()}
    bwd_calls = {k: c[0] - fwd_calls[k] for k, c in calls.items()}
    return loss.detach(), grads, nfe, fwd_calls, bwd_calls


def _compare_conv(overrides, rtol=1e-7, atol=1e-10, dtype=F64):
    model, calls = _conv_model(overrides, dtype)
    l0, g0, nfe0, f0, _ = _conv_step(model, calls, False, dtype)
    l1, g1, nfe1, f1, b1 = _conv_step(model, calls, True, dtype)
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=atol)
    assert len(g0) > 10 and all(g is not None for g in g0)
    for i, (a, b) in enumerate(zip(g1, g0)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}: {m}")
    assert len(nfe1) >= 2  # a block per scale
    for name in nfe0:
        assert nfe1[name][0] == nfe0[name][0] == f0[name] == f1[name] > 20
        # each backward evaluation is one dynamics call, and only those are counted as backward
        assert nfe1[name][1] == b1[name] > 0
    return model


@pytest.mark.parametrize("overrides", [
    [],  # FFJORD's multiscale model: concat convolutions, Rademacher Hutchinson
    ["model.layer_type=concatsquash", "model.noise=gaussian", "solver.method=bosh3"],
    ["model.divergence=exact"],
], ids=["hutchinson-dopri5", "concatsquash-bosh3", "exact-trace"])
def test_recompute_equals_direct_backpropagation_on_a_conv_cnf(overrides):
    _compare_conv(overrides)


def test_recompute_with_rnode_regularisers_and_a_learned_end_time():
    """Kinetic and Jacobian-Frobenius rates integrated as extra states; TO-FLOW's end time T is a
    parameter of the right-hand side (the time grid stays [0, 1]): loss and every gradient, T's too."""
    model = _compare_conv(["model.kinetic_weight=0.1", "model.jacobian_weight=0.1", "endtime.policy=toflow"])
    assert all(len(b.regularizers) == 2 and b.end_time.requires_grad for b in model.cnf_blocks())


def test_recompute_in_float32_on_a_conv_cnf():
    _compare_conv(["model.divergence=hutchinson"], rtol=2e-4, atol=1e-5, dtype=torch.float32)


def test_recompute_on_mlp_blocks_with_the_packed_exact_trace():
    """Concat-squash MLP blocks with exact trace and no fusion: every evaluation takes the packed
    parameters (one autograd node shared by all evaluations) through the hand-written trace."""
    cfg = load_recipe("toy-ffjord", ["solver.gradient=direct", "model.hidden_dims=[16,16]", "model.num_blocks=2",
                                     "solver.atol=1e-6", "solver.rtol=1e-6"])
    results = []
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 1.5
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(replace(cfg, solver=replace(cfg.solver, gradient="recompute" if recompute else "direct")),
                            DataBundle(name="fake", train=DataSplit(x.float()), test=DataSplit(x.float()), shape=(2,),
                                       num_classes=None, levels=None, split="fake")).to(F64)
        xx = x.clone().requires_grad_(True)
        loss = -model.log_prob(xx).mean()
        loss.backward()
        results.append([loss.detach(), xx.grad, *(p.grad for p in model.parameters() if p.requires_grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- mixed precision: the recomputed backward pass in bfloat16 ----------------------------------

def test_backward_precision_needs_recompute():
    for gradient in ("direct", "adjoint"):
        with pytest.raises(ConfigError, match=r"solver\.backward_precision=bfloat16 needs solver\.gradient=recompute"):
            SolverConfig(gradient=gradient, backward_precision="bfloat16")
    with pytest.raises(ConfigError, match="backward_precision=bfloat16 needs per-stage recomputation"):
        SolverConfig(backward_precision="bfloat16", backend="torchdiffeq")
    with pytest.raises(ConfigError, match="backward_precision"):
        SolverConfig(gradient="recompute", backward_precision="float16")
    assert SolverConfig().backward_precision == "float32"
    assert SolverConfig(backward_precision="bfloat16").gradient == "auto"
    cfg = load_recipe("digits-cnf", ["solver.gradient=recompute", "solver.backward_precision=bfloat16"])
    assert cfg.solver.backward_precision == "bfloat16"


@pytest.mark.parametrize("overrides", [[], ["model.divergence=exact"]], ids=["hutchinson", "exact-trace"])
def test_a_bfloat16_backward_pass_rounds_the_gradient_and_nothing_else(overrides):
    """A float32 conv CNF: with ``backward_precision=bfloat16`` the loss and the forward and backward
    NFE are the float32 recompute's exactly (the forward solve is untouched), the convolutions of the
    backward pass (and only those) run in bfloat16, and the gradients differ from float32's by
    bfloat16 rounding: more than float32 rounding, less than 3% in norm."""
    model, calls = _conv_model(overrides, torch.float32)
    dtypes: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    l0, g0, nfe0, f0, b0 = _conv_step(model, calls, True, torch.float32)
    assert set(dtypes) == {torch.float32}
    n_forward = sum(f0.values()) * len(dtypes) // (sum(f0.values()) + sum(b0.values()))
    dtypes.clear()
    l1, g1, nfe1, f1, b1 = _conv_step(model, calls, True, torch.float32, precision="bfloat16")
    assert torch.equal(l1, l0) and nfe1 == nfe0 and f1 == f0 and b1 == b0
    assert set(dtypes[:n_forward]) == {torch.float32} and set(dtypes[n_forward:]) == {torch.bfloat16}
    assert all(a.dtype == b.dtype == torch.float32 for a, b in zip(g1, g0))
    flat0, flat1 = torch.cat([g.flatten() for g in g0]), torch.cat([g.flatten() for g in g1])
    rel = float((flat1 - flat0).norm() / flat0.norm())
    assert 1e-4 < rel < 3e-2, rel


# ---- memory: what the forward solve keeps, what the backward pass holds at once ------------------

class _Holder:
    """What autograd keeps of a saved tensor while :class:`_SavedBytes` counts: dies with the graph."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t) -> None:
        self.t = t


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward while :meth:`hooks` is active and that the
    graphs still hold (distinct storages, ``exclude``'s excluded): ``now``, and the ``peak`` of
    what was held at once. Counts storage bytes, never times."""

    def __init__(self, exclude=()) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.held: dict[int, list] = {}  # storage -> [holders, bytes, shape]
        self.now = self.peak = 0

    def _pack(self, t):
        holder = _Holder(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            entry = self.held.setdefault(ptr, [0, t.untyped_storage().nbytes(), tuple(t.shape)])
            if entry[0] == 0:
                self.now += entry[1]
                self.peak = max(self.peak, self.now)
            entry[0] += 1
            weakref.finalize(holder, self._release, ptr)
        return holder

    def _release(self, ptr: int) -> None:
        entry = self.held[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.held[ptr]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.t)


def _hutchinson_model():
    """The conv model with Hutchinson's estimator; records every block's input (its state ``z``)."""
    model, _ = _conv_model(["model.divergence=hutchinson"])
    inputs: dict = {}
    for b in model.cnf_blocks():
        b.register_forward_pre_hook(lambda m, args, name=b.name: inputs.__setitem__(name, args[0].detach()))
    x = (torch.rand(3, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1)
    return model, inputs, x


def _one_evaluation_bytes(block, z, exclude) -> int:
    """Saved bytes of one evaluation ``f(s, (z, logdet))`` of ``block``'s right-hand side as its
    solves build it, with the graph a differentiated evaluation has (Hutchinson's VJP with
    create_graph)."""
    from fastcnf.cnf.block import _SolveODE

    func = _SolveODE(block.net, block.divergence, block.end_time_policy(), block.divergence.sample_noise(z), True,
                     block.active_regularizers)
    y = (z.clone().requires_grad_(True), torch.zeros(len(z), dtype=z.dtype, requires_grad=True))
    counter = _SavedBytes(exclude)
    with counter.hooks():
        out = func(torch.tensor(0.5, dtype=z.dtype), y)
    gc.collect()
    assert out[0].requires_grad and out[1].requires_grad
    return counter.now


def test_recompute_keeps_states_across_the_forward_solve_where_the_recorded_solve_keeps_every_activation():
    model, inputs, x = _hutchinson_model()
    params = list(model.parameters())
    stages = len(LEAN_METHODS["dopri5"].alpha)
    saved = {}
    for recompute in (False, True):
        _set_recompute(model, recompute)
        torch.manual_seed(7)
        counter = _SavedBytes(params)
        with counter.hooks():
            out = model.log_prob(x.clone().requires_grad_(True)).mean()
        gc.collect()
        saved[recompute] = counter.now
        out.backward()
    # accepted steps per block: the backward pass evaluates every accepted step's stages, and the
    # last stage once more (the output at s = 1 is interpolated inside the last step)
    bound = 0
    for b in model.cnf_blocks():
        accepted, interpolated = divmod(b.nfe.backward, stages)
        assert accepted >= 2 and interpolated <= 1
        z = inputs[b.name]
        state_bytes = (z.numel() + z.shape[0]) * z.element_size()  # z and logdet
        bound += ((stages + 1) * accepted + 1) * state_bytes  # y0 and the stages' k of each step, the end state
    # what the forward solves keep: (stages + 1) states per accepted step, plus the model's graph
    # outside the solves (a few data-sized tensors); no network activation
    outside = 10 * (x.numel() + x.shape[0]) * x.element_size()
    assert 0 < saved[True] <= bound + outside, (saved, bound)
    assert saved[False] > 10 * saved[True], saved


def test_recompute_holds_one_evaluations_graph_at_a_time_in_the_backward_pass():
    """The peak of the bytes saved for backward that the backward pass holds at once is one
    evaluation's graph (of the largest block), not one step's (the per-step replay held ~7 times as
    much here: every stage of a dopri5 step) nor the solve's."""
    model, inputs, x = _hutchinson_model()
    params = list(model.parameters())
    _set_recompute(model, True)
    torch.manual_seed(7)
    out = model.log_prob(x.clone().requires_grad_(True)).mean()
    counter = _SavedBytes(params)
    with counter.hooks():
        out.backward()
    gc.collect()
    assert counter.now == 0  # every recomputed graph was freed
    torch.manual_seed(0)
    one = max(_one_evaluation_bytes(b, inputs[b.name], params) for b in model.cnf_blocks())
    assert all(b.nfe.backward > 12 for b in model.cnf_blocks())
    assert 0.9 * one <= counter.peak <= 1.5 * one, (counter.peak, one)


# ---- fused MLP blocks ------------------------------------------------------------------------------

def test_a_fused_eligible_block_with_recompute_takes_the_recompute_path(monkeypatch):
    """A concat-squash MLP block with exact trace solves fused by default; with recompute=true and a
    gradient it takes the per-stage recomputation instead (the fused solve keeps every
    evaluation's activations) with the same loss and gradients; without a gradient it stays fused."""
    import importlib

    block_module = importlib.import_module("fastcnf.cnf.block")
    solve_module = importlib.import_module("fastcnf.ode.solve")  # fastcnf.ode.solve is also the function

    calls = {"fused": 0, "recompute": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(block_module, "fused_solve", counting("fused", block_module.fused_solve))
    monkeypatch.setattr(solve_module, "recomputed_solve", counting("recompute", solve_module.recomputed_solve))
    cfg = load_recipe("toy-ffjord", ["model.hidden_dims=[16,16]", "model.num_blocks=2",
                                     "solver.atol=1e-6", "solver.rtol=1e-6"])
    assert cfg.solver.gradient == "auto"
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 1.5
    results, used = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(replace(cfg, solver=replace(cfg.solver, gradient="recompute" if recompute else "auto")),
                            DataBundle(name="fake", train=DataSplit(x.float()), test=DataSplit(x.float()), shape=(2,),
                                       num_classes=None, levels=None, split="fake")).to(F64)
        calls.update(fused=0, recompute=0)
        xx = x.clone().requires_grad_(True)
        loss = -model.log_prob(xx).mean()
        loss.backward()
        used.append(dict(calls))
        results.append([loss.detach(), xx.grad, *(p.grad for p in model.parameters() if p.requires_grad)])
        calls.update(fused=0, recompute=0)
        with torch.no_grad():
            model.log_prob(x)
        assert calls == {"fused": 2, "recompute": 0}
    # auto: two of the four fused solves are its probes (one no-grad solve per block, first batch)
    assert used == [{"fused": 4, "recompute": 0}, {"fused": 0, "recompute": 2}]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

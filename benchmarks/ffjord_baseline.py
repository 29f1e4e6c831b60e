"""FFJORD's 2-D toy training (``train_toy.py`` defaults) in plain torch + torchdiffeq.

This is the reference fastcnf's speed is measured against (``speed_toy.py``). It does not import fastcnf.
It re-implements, from the published FFJORD code (Grathwohl et al. 2019, github.com/rtqichen/ffjord,
``train_toy.py``, ``train_misc.py``, ``lib/layers/{cnf,odefunc}.py``,
``lib/layers/diffeq_layers/basic.py``, ``lib/toy_data.py``), the parts its toy defaults use:

* dynamics: ``ODEnet`` of concat-squash layers ``2 -> 64 -> 64 -> 64 -> 2`` with tanh between
  layers; a layer is ``Linear(x) * sigmoid(Linear_gate(t)) + Linear_bias(t)`` (no bias on the last);
* divergence: ``divergence_bf``, one ``autograd.grad(..., create_graph=True)`` per dimension,
  always with a graph (FFJORD builds it in the adjoint's no-grad forward solve too);
* ``ODEfunc``: copies ``t`` to a new tensor, counts evaluations, returns ``(dz, -div)``;
* ``CNF``: one block, ``T = sqrt_end_time ** 2 = 0.5`` (FFJORD's ``--train_T True`` builds
  ``torch.tensor([0, T])`` from the parameter, which detaches it: T never trains, so it is a
  constant here), state ``(z, zeros(B, 1))``, ``odeint_adjoint`` with dopri5, atol = rtol = 1e-5
  for training, evaluation and the adjoint solve;
* loss: ``-mean(log N(z; 0, I) - delta_logp)``; Adam(lr 1e-3, weight decay 1e-5); batch 100;
* data: ``inf_train_gen``, a fresh batch every iteration;
* validation every ``val_freq = 100`` iterations on a fresh ``test_batch_size = 1000`` batch
  (FFJORD's defaults), in eval mode under ``torch.no_grad()``.

Deliberate, documented differences from the published script:

* tolerances are passed as scalars. FFJORD passes ``[atol, atol]`` (one per state) for dopri5;
  the values are equal so the error test is the same, and torchdiffeq 0.2.5's adjoint rejects a
  two-entry list for its larger backward state;
* every random number comes from a seeded ``numpy.random.RandomState`` (FFJORD's 8gaussians draws
  from an unseeded ``RandomState()`` and its checkerboard from the global NumPy state), and
  ``torch.manual_seed(seed)`` fixes the initialisation;
* no plots, checkpoints or log files (not part of what is timed);
* the final test NLL is measured on a fresh sample of ``--test-size`` points (default 20,000),
  or on the points of ``--test-file`` (the benchmark passes fastcnf's test split, so that both
  are measured on the same points); FFJORD's own validation batch of 1,000 has a standard error
  of several hundredths of a nat, too coarse for a 0.05-nat comparison.

Run ``python benchmarks/ffjord_baseline.py --data 8gaussians --iterations 1000 --json out.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from torch import nn
from torchdiffeq import odeint_adjoint

from common import write_json

__all__ = ["TOY_DATA", "inf_train_gen", "ODEnet", "ODEfunc", "CNF", "build_model", "compute_loss",
           "train", "evaluate_nll"]

TOY_DATA = ("swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals", "checkerboard")


# ---- data: FFJORD lib/toy_data.py inf_train_gen ------------------------------------------------
def inf_train_gen(data: str, rng: np.random.RandomState, batch_size: int = 200) -> np.ndarray:
    """A fresh batch of FFJORD toy data, every draw from ``rng``. Returns float32 (batch, 2)."""
    if data == "8gaussians":
        # FFJORD draws point by point in a Python loop; the loop is part of its per-iteration cost
        scale = 4.0
        s = 1.0 / np.sqrt(2)
        centers = [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]
        centers = [(scale * x, scale * y) for x, y in centers]
        points = []
        for _ in range(batch_size):
            point = rng.randn(2) * 0.5
            cx, cy = centers[rng.randint(8)]
            point[0] += cx
            point[1] += cy
            points.append(point)
        return np.array(points, dtype="float32") / 1.414
    if data == "checkerboard":
        x1 = rng.rand(batch_size) * 4 - 2
        x2_ = rng.rand(batch_size) - rng.randint(0, 2, batch_size) * 2
        x2 = x2_ + (np.floor(x1) % 2)
        return (np.concatenate([x1[:, None], x2[:, None]], 1) * 2).astype("float32")
    if data == "pinwheel":
        radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
        num_per_class = batch_size // 5
        rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
        features = rng.randn(num_classes * num_per_class, 2) * np.array([radial_std, tangential_std])
        features[:, 0] += 1.0
        labels = np.repeat(np.arange(num_classes), num_per_class)
        angles = rads[labels] + rate * np.exp(features[:, 0])
        rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)])
        rotations = np.reshape(rotations.T, (-1, 2, 2))
        return (2 * rng.permutation(np.einsum("ti,tij->tj", features, rotations))).astype("float32")
    if data == "2spirals":
        n = np.sqrt(rng.rand(batch_size // 2, 1)) * 540 * (2 * np.pi) / 360
        d1x = -np.cos(n) * n + rng.rand(batch_size // 2, 1) * 0.5
        d1y = np.sin(n) * n + rng.rand(batch_size // 2, 1) * 0.5
        x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
        x += rng.randn(*x.shape) * 0.1
        return x.astype("float32")
    if data == "rings":
        n_samples4 = n_samples3 = n_samples2 = batch_size // 4
        n_samples1 = batch_size - n_samples4 - n_samples3 - n_samples2
        lin = [np.linspace(0, 2 * np.pi, n, endpoint=False) for n in (n_samples4, n_samples3, n_samples2, n_samples1)]
        radii = (1.0, 0.75, 0.5, 0.25)
        xs = np.hstack([np.cos(a) * r for a, r in zip(lin, radii)])
        ys = np.hstack([np.sin(a) * r for a, r in zip(lin, radii)])
        x = np.vstack([xs, ys]).T * 3.0
        x = x[rng.permutation(batch_size)]
        return (x + rng.normal(scale=0.08, size=x.shape)).astype("float32")
    if data in ("swissroll", "circles", "moons"):
        import sklearn.datasets  # only these three need scikit-learn

        seed = int(rng.randint(2**31 - 1))
        if data == "swissroll":
            x = sklearn.datasets.make_swiss_roll(n_samples=batch_size, noise=1.0, random_state=seed)[0]
            return (x.astype("float32")[:, [0, 2]] / 5).astype("float32")
        if data == "circles":
            x = sklearn.datasets.make_circles(n_samples=batch_size, factor=0.5, noise=0.08, random_state=seed)[0]
            return (x.astype("float32") * 3).astype("float32")
        x = sklearn.datasets.make_moons(n_samples=batch_size, noise=0.1, random_state=seed)[0]
        return (x.astype("float32") * 2 + np.array([-1, -0.2])).astype("float32")
    raise ValueError(f"unknown toy data {data!r}; valid: {', '.join(TOY_DATA)}")


# ---- model: FFJORD ODEnet / ODEfunc / CNF -------------------------------------------------------
class ConcatSquashLinear(nn.Module):
    """FFJORD diffeq_layers.ConcatSquashLinear."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class ODEnet(nn.Module):
    """FFJORD ODEnet (tabular, concatsquash): layers with the nonlinearity between them."""

    def __init__(self, hidden_dims=(64, 64, 64), dim: int = 2, nonlinearity: str = "tanh") -> None:
        super().__init__()
        acts = {"tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU, "elu": nn.ELU}
        dims = (dim, *hidden_dims, dim)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation_fns = nn.ModuleList(acts[nonlinearity]() for _ in hidden_dims)

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


def divergence_bf(dx, y, **unused):
    """FFJORD's brute-force exact trace: one autograd pass per dimension, with a graph."""
    sum_diag = 0.0
    for i in range(y.shape[1]):
        sum_diag += torch.autograd.grad(dx[:, i].sum(), y, create_graph=True)[0].contiguous()[:, i].contiguous()
    return sum_diag.contiguous()


class ODEfunc(nn.Module):
    """FFJORD ODEfunc with ``divergence_fn="brute_force"`` (the toy default)."""

    def __init__(self, diffeq: nn.Module) -> None:
        super().__init__()
        self.diffeq = diffeq
        self.divergence_fn = divergence_bf
        self.register_buffer("_num_evals", torch.tensor(0.0))

    def before_odeint(self) -> None:
        self._num_evals.fill_(0)

    def num_evals(self) -> int:
        return int(self._num_evals.item())

    def forward(self, t, states):
        y = states[0]
        self._num_evals += 1
        # FFJORD: t = torch.tensor(t).type_as(y) (a copy; clone().detach() is the warning-free spelling)
        t = t.clone().detach().type_as(y)
        batchsize = y.shape[0]
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            dy = self.diffeq(t, y)
            divergence = self.divergence_fn(dy, y).view(batchsize, 1)
        return dy, -divergence


class CNF(nn.Module):
    """FFJORD CNF block (no regularisation states), adjoint back-propagation."""

    def __init__(self, odefunc: ODEfunc, T: float = 0.5, solver: str = "dopri5", atol: float = 1e-5,
                 rtol: float = 1e-5) -> None:
        super().__init__()
        # FFJORD registers sqrt(T) as a parameter with --train_T True, but builds the time points
        # with torch.tensor([...]), which detaches it; a buffer is the faithful equivalent.
        self.register_buffer("sqrt_end_time", torch.sqrt(torch.tensor(T)))
        self.odefunc = odefunc
        self.solver, self.atol, self.rtol = solver, atol, rtol
        self.test_solver, self.test_atol, self.test_rtol = solver, atol, rtol

    def forward(self, z, logpz=None):
        _logpz = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        integration_times = torch.tensor([0.0, float(self.sqrt_end_time * self.sqrt_end_time)]).to(z)
        self.odefunc.before_odeint()
        if self.training:
            state_t = odeint_adjoint(self.odefunc, (z, _logpz), integration_times, atol=self.atol,
                                     rtol=self.rtol, method=self.solver)
        else:
            state_t = odeint_adjoint(self.odefunc, (z, _logpz), integration_times, atol=self.test_atol,
                                     rtol=self.test_rtol, method=self.test_solver)
        z_t, logpz_t = (s[1] for s in state_t)
        return z_t, logpz_t

    def num_evals(self) -> int:
        return self.odefunc.num_evals()


def build_model(dims=(64, 64, 64), time_length: float = 0.5, atol: float = 1e-5, rtol: float = 1e-5) -> CNF:
    return CNF(ODEfunc(ODEnet(dims, 2, "tanh")), T=time_length, atol=atol, rtol=rtol)


def standard_normal_logprob(z):
    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


def compute_loss(model: CNF, x: torch.Tensor) -> torch.Tensor:
    """FFJORD train_toy.compute_loss on a given batch: mean negative log-likelihood in nats."""
    zero = torch.zeros(x.shape[0], 1).to(x)
    z, delta_logp = model(x, zero)
    logpz = standard_normal_logprob(z).sum(1, keepdim=True)
    logpx = logpz - delta_logp
    return -torch.mean(logpx)


def evaluate_nll(model: CNF, x: torch.Tensor) -> tuple[float, int]:
    """Test NLL (nats) of ``x`` in eval mode under no_grad, and the NFE of that solve."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        nll = float(compute_loss(model, x))
    nfe = model.num_evals()
    model.train(was_training)
    return nll, nfe


def train(data: str = "8gaussians", iterations: int = 1000, seed: int = 0, batch_size: int = 100,
          lr: float = 1e-3, weight_decay: float = 1e-5, val_freq: int = 100, val_batch_size: int = 1000,
          test_size: int = 20000, eval_every: int = 0, log_every: int = 0,
          test_x: torch.Tensor | None = None) -> dict:
    """FFJORD's toy training loop. Returns per-iteration records and the final test NLL.

    The test NLL is measured on ``test_x`` when given, else on a fresh sample of ``test_size``
    points. ``eval_every`` > 0 additionally records the test NLL every that many iterations
    (outside the timed steps; used for time-to-quality curves).
    """
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    test_rng = np.random.RandomState(seed + 1)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if test_x is None:
        test_x = torch.from_numpy(inf_train_gen(data, test_rng, batch_size=test_size))
    step_seconds, cpu_seconds, losses, nfe_f, nfe_b, curve, val = [], [], [], [], [], [], []
    train_seconds = 0.0
    model.train()
    for itr in range(1, iterations + 1):
        t0 = time.perf_counter()
        c0 = time.process_time()
        optimizer.zero_grad()
        x = torch.from_numpy(inf_train_gen(data, rng, batch_size=batch_size)).type(torch.float32)
        loss = compute_loss(model, x)
        nfe_forward = model.num_evals()
        loss.backward()
        optimizer.step()
        nfe_total = model.num_evals()
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        cpu_seconds.append(time.process_time() - c0)
        train_seconds += dt
        step_seconds.append(dt)
        losses.append(loss_value)
        nfe_f.append(nfe_forward)
        nfe_b.append(nfe_total - nfe_forward)
        if log_every and itr % log_every == 0:
            print(f"[ffjord] iter {itr:5d} | {dt:.4f}s | loss {loss_value:.4f} | "
                  f"nfe {nfe_forward}/{nfe_total - nfe_forward}", file=sys.stderr, flush=True)
        if val_freq and (itr % val_freq == 0 or itr == iterations):
            vx = torch.from_numpy(inf_train_gen(data, rng, batch_size=val_batch_size))
            val.append({"iteration": itr, "nll": evaluate_nll(model, vx)[0]})
        if eval_every and itr % eval_every == 0 and itr != iterations:
            curve.append({"iteration": itr, "train_seconds": train_seconds, "test_nll": evaluate_nll(model, test_x)[0]})
    t0 = time.perf_counter()
    test_nll, test_nfe = evaluate_nll(model, test_x)
    eval_seconds = time.perf_counter() - t0
    curve.append({"iteration": iterations, "train_seconds": train_seconds, "test_nll": test_nll})
    last = step_seconds[-100:]
    return {
        "implementation": "ffjord-baseline",
        "data": data,
        "iterations": iterations,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "seconds_per_iteration_last100": sum(last) / len(last),
        "cpu_seconds_per_iteration_last100": sum(cpu_seconds[-100:]) / len(cpu_seconds[-100:]),
        "nfe_forward_last100": float(np.mean(nfe_f[-100:])),
        "nfe_backward_last100": float(np.mean(nfe_b[-100:])),
        "nfe_forward_final": nfe_f[-1],
        "nfe_backward_final": nfe_b[-1],
        "train_seconds": train_seconds,
        "test_nll_nats": test_nll,
        "test_nfe": test_nfe,
        "test_size": int(test_x.shape[0]),
        "test_eval_seconds": eval_seconds,
        "validation": val,
        "curve": curve,
        "step_seconds": step_seconds,
        "step_cpu_seconds": cpu_seconds,
        "loss": losses,
        "nfe_forward": nfe_f,
        "nfe_backward": nfe_b,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="8gaussians", choices=TOY_DATA)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--val-freq", type=int, default=100, help="FFJORD's periodic validation (0 disables)")
    p.add_argument("--test-size", type=int, default=20000)
    p.add_argument("--test-file", default=None, help="evaluate on the (N, 2) float32 array in this .npy file")
    p.add_argument("--eval-every", type=int, default=0, help="record the test NLL every N iterations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--json", default=None, help="write the metrics here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    test_x = torch.from_numpy(np.load(args.test_file).astype("float32")) if args.test_file else None
    metrics = train(args.data, args.iterations, args.seed, batch_size=args.batch_size, val_freq=args.val_freq,
                    test_size=args.test_size, eval_every=args.eval_every, log_every=args.log_every, test_x=test_x)
    summary = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_json(args.json, metrics, indent=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

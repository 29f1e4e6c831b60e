"""FFJORD's multiscale image training (``train_cnf.py``) in plain torch + torchdiffeq.

The reference fastcnf's image speed is measured against. It does not import fastcnf. It
re-implements, from the published FFJORD code (Grathwohl et al. 2019, github.com/rtqichen/ffjord at
commit 994864a: ``train_cnf.py``, ``train_misc.py``, ``lib/odenvp.py``, ``lib/layers/{cnf,odefunc,
elemwise,squeeze,container}.py``, ``lib/layers/diffeq_layers/basic.py``,
``lib/layers/wrappers/cnf_regularization.py``), what this command line uses::

    python train_cnf.py --data mnist --dims 64,64,64 --strides 1,1,1,1 --num_blocks 1 \\
        --layer_type concat --multiscale True --rademacher True

with every other flag at its default:

* model: ``ODENVP``. Scales: one per halving while height and width are >= 4 (28x28 -> 3, 8x8 -> 2).
  Per scale: (logit transform, alpha 1e-6, at the first), ``num_blocks`` CNF blocks, then, except
  at the last scale, a squeeze (C, H, W) -> (4C, H/2, W/2), ``num_blocks`` more blocks, and a
  factor-out of half the channels. ``StackedCNFLayers`` hard-codes ``layer_type="concat"`` and
  strides 1 whatever ``--layer_type`` / ``--strides`` say: each block's network is
  ``ConcatConv2d`` 3x3 layers C -> 64 -> 64 -> 64 -> C (the time as an extra input channel) with
  softplus between layers;
* ``CNF``: ``train_T`` defaults to True, so each block has a parameter ``sqrt_end_time`` (sqrt(1)),
  counted among the parameters, but ``torch.tensor([0, T])`` detaches it: T = 1 always;
  ``odeint_adjoint`` with dopri5, atol = rtol = 1e-5 (training, test and the adjoint solve);
* ``ODEfunc``: Hutchinson's estimator (``divergence_approx``: one ``autograd.grad`` with
  ``create_graph=True``, also in the adjoint's no-grad forward solve) with Rademacher noise drawn
  at the first evaluation of a solve and kept for the rest of it and its adjoint solve; ``t`` is
  copied to a new tensor; each evaluation adds one to the block's counter. NFE as FFJORD counts
  it (``count_nfe`` after ``loss.backward()``): the sum over blocks of forward *and* backward
  evaluations of the iteration; reported here also split into forward (read before the backward
  pass) and backward (the difference);
* loss: bits/dim ``-(sum log p(x) / x.nelement() - log 256) / log 2`` of the batch; Adam(lr 1e-3,
  weight decay 0) with ``update_lr``'s linear warm-up over 1,000 iterations
  (``lr = 1e-3 * min((itr + 1) / 1000, 1)``); ``clip_grad_norm_(max 1e10)`` (no clipping, but
  part of FFJORD's iteration); batch 200, shuffled, ``drop_last``; test batch 200;
* data: ``(x * 255 + u) / 256`` with ``u ~ U[0, 1)`` (``add_noise``), x = pixels / 255.

Parameter count (derived from the code above, checked by :func:`ffjord_parameter_count`): a
ConcatConv2d layer c_in -> c_out has (c_in + 1) * 9 * c_out + c_out parameters, so a block on C
channels has 9 * 64 * (C + 1) + 64 + 2 * (65 * 9 * 64 + 64) + 65 * 9 * C + C, plus its
``sqrt_end_time``. MNIST, one block per scale: blocks on 1, 4, 2, 8, 4 channels = 76,811 + 80,297
+ 77,973 + 84,945 + 80,297 = **400,323**; two blocks per scale: **800,646**.

Deliberate, documented differences from the published script:

* data: ``mnist-test-split`` (MNIST's t10k files only, first 9,000 train / last 1,000 test; the
  full training set is not on this machine) read from IDX files, not torchvision; ``digits``
  (scikit-learn, 8x8, 17 grey levels, fastcnf's fixed split: numpy ``default_rng(0)`` permutation,
  first 1,437 train) with the same architecture at 8x8 (2 scales, 3 blocks per ``num_blocks``),
  dequantised as ``(x + u) / 17`` with bits/dim against 17 levels (FFJORD has no such data set);
* every random number is seeded (``torch.manual_seed``, a NumPy ``RandomState`` for batches and
  dequantisation); the Rademacher noise is drawn from torch's global generator as FFJORD does;
* ``layer_type="concatsquash"`` (FFJORD's ``ConcatSquashConv2d``) is offered for the side-by-side
  benchmark only, to run FFJORD's engine on fastcnf's network with the same weights; it is not
  FFJORD's multiscale model;
* the empty ``RegularizedODEfunc`` wrapper (no regulariser flags) and the torchvision loaders are
  left out; no logging, checkpoints or sample figures (not part of what is timed);
* ``DataParallel`` / ``cudnn.benchmark``: with ``--device cuda`` the model runs on one GPU.

Run ``python benchmarks/ffjord_multiscale_baseline.py --data digits --iterations 20 --batch-size 200``
(``--help`` lists the options).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint_adjoint

__all__ = ["load_images", "ffjord_parameter_count", "build_model", "count_nfe", "bits_per_dim",
           "update_lr", "train_step", "evaluate_bits_per_dim", "dequantize_batch", "LAYER_TYPES"]

DEFAULT_MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ---- data ---------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_images(data: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, test, levels)``: uint8 images ``(N, 1, H, W)`` and the number of grey levels.

    ``mnist-test-split``: MNIST's t10k images, first 9,000 train / last 1,000 test (256 levels).
    ``digits``: scikit-learn's digits, fastcnf's fixed split (17 levels).
    """
    if data == "mnist-test-split":
        root = Path(root) if root is not None else DEFAULT_MNIST_ROOT
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"):
            if (root / name).exists():
                images = _read_idx(root / name)[:, None]
                return images[:9000].copy(), images[9000:].copy(), 256
        raise FileNotFoundError(f"no t10k-images-idx3-ubyte[.gz] in {root}")
    if data == "digits":
        from sklearn.datasets import load_digits

        images = np.asarray(load_digits().images).astype(np.uint8)[:, None]
        order = np.random.default_rng(0).permutation(len(images))
        n_train = int(math.floor(0.8 * len(images) + 1e-9))
        return images[order[:n_train]], images[order[n_train:]], 17
    raise ValueError(f"unknown data {data!r}; accepted: mnist-test-split, digits")


def dequantize_batch(images: np.ndarray, levels: int, rng: np.random.RandomState) -> torch.Tensor:
    """FFJORD's ``add_noise``: ``(x + u) / levels`` with ``u ~ U[0, 1)`` (x = integer pixel)."""
    noise = rng.uniform(size=images.shape)
    return torch.from_numpy(((images.astype(np.float64) + noise) / levels).astype(np.float32))


# ---- layers: lib/layers/diffeq_layers/basic.py, odefunc.py, cnf.py, elemwise.py, squeeze.py ----
class ConcatConv2d(nn.Module):
    """FFJORD ``ConcatConv2d``: a 3x3 convolution of ``[t; x]`` (the time as one more channel)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self._layer = nn.Conv2d(dim_in + 1, dim_out, kernel_size=3, stride=1, padding=1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self._layer(torch.cat([tt, x], 1))


class ConcatSquashConv2d(nn.Module):
    """FFJORD ``ConcatSquashConv2d``: ``conv(x) * sigmoid(G t + g) + H t`` (benchmark option)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self._layer = nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1)
        self._hyper_gate = nn.Linear(1, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, x):
        return (self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))).view(1, -1, 1, 1)
                + self._hyper_bias(t.view(1, 1)).view(1, -1, 1, 1))


LAYER_TYPES = {"concat": ConcatConv2d, "concatsquash": ConcatSquashConv2d}


class ODEnet(nn.Module):
    """FFJORD ``ODEnet`` (conv, strides 1): layers C -> hidden... -> C, softplus between them."""

    def __init__(self, hidden_dims, channels: int, layer_type: str = "concat") -> None:
        super().__init__()
        layer = LAYER_TYPES[layer_type]
        dims = [channels, *hidden_dims, channels]
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation_fns = nn.ModuleList(nn.Softplus() for _ in hidden_dims)

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


def divergence_approx(f, y, e):
    """FFJORD ``divergence_approx``: ``(e^T df/dy) e`` by one VJP, always with ``create_graph``."""
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    return (e_dzdx * e).view(y.shape[0], -1).sum(dim=1)


class ODEfunc(nn.Module):
    """FFJORD ``ODEfunc`` with ``divergence_fn="approximate"``, ``rademacher=True``."""

    def __init__(self, diffeq: ODEnet) -> None:
        super().__init__()
        self.diffeq = diffeq
        self.register_buffer("_num_evals", torch.tensor(0.0))
        self._e = None

    def before_odeint(self) -> None:
        self._e = None
        self._num_evals.fill_(0)

    def num_evals(self) -> float:
        return self._num_evals.item()

    def forward(self, t, states):
        y = states[0]
        self._num_evals += 1
        t = t.detach().clone().type_as(y)  # FFJORD: torch.tensor(t).type_as(y), a new leaf
        batchsize = y.shape[0]
        if self._e is None:  # sampled at the first evaluation, kept for the solve and its adjoint
            self._e = torch.randint(low=0, high=2, size=y.shape).to(y) * 2 - 1
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            dy = self.diffeq(t, y)
            divergence = divergence_approx(dy, y, e=self._e).view(batchsize, 1)
        return dy, -divergence


class CNF(nn.Module):
    """FFJORD ``CNF`` with ``train_T=True`` (a parameter that never trains: see the docstring)."""

    def __init__(self, odefunc: ODEfunc, T: float = 1.0, atol: float = 1e-5, rtol: float = 1e-5,
                 solver: str = "dopri5") -> None:
        super().__init__()
        self.sqrt_end_time = nn.Parameter(torch.sqrt(torch.tensor(T)))
        self.odefunc = odefunc
        self.atol, self.rtol, self.solver = atol, rtol, solver

    def forward(self, z, logpz):
        # torch.tensor([0.0, sqrt_end_time ** 2]) in FFJORD: the value only, no gradient to T
        end = float(self.sqrt_end_time.detach() ** 2)
        times = torch.tensor([0.0, end], dtype=z.dtype, device=z.device)
        self.odefunc.before_odeint()
        z_t, logpz_t = odeint_adjoint(self.odefunc, (z, logpz), times, atol=self.atol, rtol=self.rtol,
                                      method=self.solver)
        return z_t[1], logpz_t[1]


class LogitTransform(nn.Module):
    """FFJORD ``LogitTransform``: ``y = logit(alpha + (1 - 2 alpha) x)`` with its log-determinant."""

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x, logpx):
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log(1 - s)
        logdetgrad = -torch.log(s - s * s) + math.log(1 - 2 * self.alpha)
        return y, logpx - logdetgrad.view(x.size(0), -1).sum(1, keepdim=True)


class SqueezeLayer(nn.Module):
    """FFJORD ``squeeze``: [B, C, rH, rW] -> [B, C r^2, H, W] with its channel order."""

    def forward(self, x, logpx):
        b, c, h, w = x.shape
        x = x.contiguous().view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).contiguous()
        return x.view(b, c * 4, h // 2, w // 2), logpx


class StackedCNFLayers(nn.Module):
    """FFJORD ``StackedCNFLayers``: (init layer), blocks, (squeeze, blocks)."""

    def __init__(self, size, hidden_dims, squeeze: bool, init_layer, n_blocks: int, layer_type: str,
                 cnf_kwargs: dict) -> None:
        super().__init__()
        c, h, w = size
        chain = [init_layer] if init_layer is not None else []
        chain += [CNF(ODEfunc(ODEnet(hidden_dims, c, layer_type)), **cnf_kwargs) for _ in range(n_blocks)]
        if squeeze:
            chain.append(SqueezeLayer())
            chain += [CNF(ODEfunc(ODEnet(hidden_dims, 4 * c, layer_type)), **cnf_kwargs) for _ in range(n_blocks)]
        self.chain = nn.ModuleList(chain)

    def forward(self, x, logpx):
        for layer in self.chain:
            x, logpx = layer(x, logpx)
        return x, logpx


def n_scales(h: int, w: int) -> int:
    """FFJORD ``ODENVP._calc_n_scale``."""
    n = 0
    while h >= 4 and w >= 4:
        n += 1
        h, w = h // 2, w // 2
    return n


class ODENVP(nn.Module):
    """FFJORD ``ODENVP`` (``squash_input=True``): the multiscale CNF, with factor-outs."""

    def __init__(self, shape, n_blocks: int = 1, hidden_dims=(64, 64, 64), alpha: float = 1e-6,
                 layer_type: str = "concat", cnf_kwargs: dict | None = None) -> None:
        super().__init__()
        c, h, w = shape
        self.n_scale = n_scales(h, w)
        transforms = []
        for i in range(self.n_scale):
            transforms.append(StackedCNFLayers((c, h, w), hidden_dims, squeeze=i < self.n_scale - 1,
                                               init_layer=LogitTransform(alpha) if i == 0 else None,
                                               n_blocks=n_blocks, layer_type=layer_type,
                                               cnf_kwargs=cnf_kwargs or {}))
            c, h, w = c * 2, h // 2, w // 2
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x, logpx):
        out = []
        for idx, transform in enumerate(self.transforms):
            x, logpx = transform(x, logpx)
            if idx < len(self.transforms) - 1:
                d = x.size(1) // 2
                x, factor_out = x[:, :d], x[:, d:]
            else:
                factor_out = x
            out.append(factor_out)
        return torch.cat([o.reshape(o.size(0), -1) for o in out], 1), logpx


def build_model(shape=(1, 28, 28), n_blocks: int = 1, hidden_dims=(64, 64, 64), layer_type: str = "concat",
                alpha: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-5, seed: int | None = 0) -> ODENVP:
    """FFJORD's multiscale model for per-example ``shape`` (C, H, W), initialised after
    ``torch.manual_seed(seed)`` (None: the current generator state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return ODENVP(tuple(shape), n_blocks, tuple(hidden_dims), alpha, layer_type,
                  {"T": 1.0, "atol": atol, "rtol": rtol, "solver": "dopri5"})


def ffjord_parameter_count(shape=(1, 28, 28), n_blocks: int = 1, hidden_dims=(64, 64, 64),
                           layer_type: str = "concat") -> int:
    """The parameter count FFJORD's code gives, from its layer formulas (not from a model)."""
    def block(c: int) -> int:
        dims = [c, *hidden_dims, c]
        total = 1  # sqrt_end_time
        for a, b in zip(dims[:-1], dims[1:]):
            total += (a + 1) * 9 * b + b if layer_type == "concat" else a * 9 * b + b + 3 * b
        return total

    c, h, w = shape
    scales = n_scales(h, w)
    total = 0
    for i in range(scales):
        total += n_blocks * block(c)
        if i < scales - 1:
            total += n_blocks * block(4 * c)
        c = 2 * c
    return total


# ---- training: train_cnf.py ---------------------------------------------------------------------
def cnf_blocks(model: nn.Module) -> list[CNF]:
    return [m for m in model.modules() if isinstance(m, CNF)]


def count_nfe(model: nn.Module) -> int:
    """FFJORD ``count_nfe``: the sum of every ODEfunc's evaluation counter."""
    return int(sum(m.num_evals() for m in model.modules() if isinstance(m, ODEfunc)))


def bits_per_dim(model: nn.Module, x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """FFJORD ``compute_bits_per_dim`` (``levels`` 256 there; 17 for digits here)."""
    zero = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    z, delta_logp = model(x, zero)
    logpz = (-0.5 * math.log(2 * math.pi) - z.pow(2) / 2).view(z.shape[0], -1).sum(1, keepdim=True)
    logpx = logpz - delta_logp
    return -(torch.sum(logpx) / x.nelement() - math.log(levels)) / math.log(2)


def update_lr(optimizer, itr: int, lr: float = 1e-3, warmup_iters: float = 1000) -> float:
    """FFJORD ``update_lr``: linear warm-up to ``lr`` over ``warmup_iters`` iterations."""
    value = lr * min(float(itr + 1) / max(warmup_iters, 1), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = value
    return value


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_step(model: nn.Module, optimizer, x: torch.Tensor, itr: int, levels: int = 256,
               lr: float = 1e-3, warmup_iters: float = 1000) -> dict:
    """One iteration of ``train_cnf.py``'s loop; returns loss, NFE (forward, backward, FFJORD's
    total) and the wall seconds of the iteration."""
    start = time.perf_counter()
    update_lr(optimizer, itr, lr, warmup_iters)
    optimizer.zero_grad()
    loss = bits_per_dim(model, x, levels)
    nfe_forward = count_nfe(model)
    loss.backward()
    nfe_total = count_nfe(model)  # what train_cnf.py logs as "Steps"
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e10)
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return {"loss": float(loss.detach()), "nfe_forward": nfe_forward, "nfe_backward": nfe_total - nfe_forward,
            "nfe_ffjord": nfe_total, "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate_bits_per_dim(model: nn.Module, x: torch.Tensor, levels: int = 256, batch_size: int = 200) -> float:
    """Mean bits/dim over ``x`` (already dequantised), in eval mode and without gradients, batches
    of ``batch_size`` (FFJORD's ``test_batch_size``), weighted by batch size."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        total += float(bits_per_dim(model, xb, levels)) * len(xb)
    model.train(was_training)
    return total / len(x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist-test-split", choices=["mnist-test-split", "digits"])
    p.add_argument("--root", default=None, help="directory of MNIST's t10k IDX files")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--dims", default="64,64,64")
    p.add_argument("--layer-type", default="concat", choices=sorted(LAYER_TYPES))
    p.add_argument("--test-size", type=int, default=200, help="test images evaluated at the end (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, test, levels = load_images(args.data, args.root)
    hidden = tuple(int(d) for d in args.dims.split(","))
    model = build_model(train.shape[1:], args.num_blocks, hidden, args.layer_type, seed=args.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = ffjord_parameter_count(train.shape[1:], args.num_blocks, hidden, args.layer_type)
    assert n_params == expected, (n_params, expected)
    print(f"parameters: {n_params:,} (FFJORD's formula: {expected:,})", flush=True)
    optimizer = make_optimizer(model)
    rng = np.random.RandomState(args.seed)
    log = []
    order = rng.permutation(len(train))
    pos = 0
    for itr in range(args.iterations):
        if pos + args.batch_size > len(order):  # drop_last, reshuffle each epoch
            order, pos = rng.permutation(len(train)), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        x = dequantize_batch(train[idx], levels, rng).to(device)
        row = train_step(model, optimizer, x, itr, levels)
        log.append(row)
        print(f"iter {itr:4d} | {row['seconds']:.2f} s | bits/dim {row['loss']:.4f} | "
              f"NFE {row['nfe_forward']} + {row['nfe_backward']}", flush=True)
    result = {"data": args.data, "parameters": n_params, "layer_type": args.layer_type, "log": log}
    if args.test_size:
        x_test = dequantize_batch(test[:args.test_size], levels, np.random.RandomState(args.seed + 1)).to(device)
        result["test_bits_per_dim"] = evaluate_bits_per_dim(model, x_test, levels)
        print(f"test bits/dim on {args.test_size} images: {result['test_bits_per_dim']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

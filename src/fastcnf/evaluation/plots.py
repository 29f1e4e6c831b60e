"""Every figure of a run (matplotlib, Agg backend), and the one reader of ``log.csv``.

Training curves, 1-D / 2-D densities, samples (image grids or scatter plots, optionally one class
per row or colour), learned-tolerance traces and distributions, LatentODE trajectories.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from fastcnf.data.batcher import model_scale

__all__ = ["read_log", "training_curves", "density_figures", "image_grid", "save_image_grid", "plot_samples",
           "density_2d", "tolerance_figures", "plot_trajectories",
           "class_conditional_samples"]


class _Pyplot:
    """``matplotlib.pyplot`` (Agg backend), imported at the first figure: a run without figures
    (``eval.figures=false``) does not pay its import (~0.4 s of CPU)."""

    _module = None

    def __getattr__(self, name: str):
        if _Pyplot._module is None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot

            _Pyplot._module = matplotlib.pyplot
        return getattr(_Pyplot._module, name)


plt = _Pyplot()


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """``log.csv`` as columns of floats (NaN where a cell is empty or not a number); {} if absent."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[k]))
            except (TypeError, ValueError):
                vals.append(np.nan)
        out[k] = np.asarray(vals)
    return out


def training_curves(log_path: str | Path, fig_dir: str | Path) -> Path | None:
    """``training_curves.png``: loss (NLL or bits/dim) and validation NLL, NFE forward/backward, end time per
    block."""
    log = read_log(log_path)
    if not log:
        return None
    it = log["iteration"]
    t_cols = [k for k in log if k.startswith("T.")]
    n = 3 if t_cols else 2
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4))
    key = "bits_per_dim" if np.isfinite(log.get("bits_per_dim", np.array([np.nan]))).any() else "nll"
    axes[0].plot(it, log[key], lw=0.8)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("bits/dim" if key == "bits_per_dim" else "NLL (nats)")
    val = log.get("val_nll", np.array([np.nan]))
    if np.isfinite(val).any():  # train.val_every: validation NLL in nats (own axis unless the loss is in nats too)
        ax = axes[0] if key == "nll" else axes[0].twinx()
        ok = np.isfinite(val)
        ax.plot(it[ok], val[ok], "o-", ms=3, lw=0.8, color="C3", label="validation")
        ax.set_ylabel("NLL (nats)")
        ax.legend(fontsize=7)
    axes[1].plot(it, log["nfe_forward"], lw=0.8, label="forward")
    axes[1].plot(it, log["nfe_backward"], lw=0.8, label="backward")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("NFE")
    axes[1].legend()
    if t_cols:
        for k in t_cols:
            axes[2].plot(it, log[k], lw=0.8, label=k[2:])
        axes[2].set_xlabel("iteration")
        axes[2].set_ylabel("end time T")
        if len(t_cols) <= 8:
            axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = Path(fig_dir) / "training_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (rows*H, nrow*W, C) array."""
    x = images.detach().clamp(0, 1).cpu().numpy()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, title: str | None = None) -> Path:
    grid = image_grid(images, nrow)
    fig, ax = plt.subplots(figsize=(max(3.0, grid.shape[1] / 16), max(3.0, grid.shape[0] / 16)))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def density_2d(model, lim: float = 4.0, npts: int = 100, device=None, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Model density on an ``npts`` x ``npts`` grid over [-lim, lim]^2 (for plots)."""
    side = torch.linspace(-lim, lim, npts, dtype=dtype or torch.float32)
    xx, yy = torch.meshgrid(side, side, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(device or "cpu")
    lp = torch.cat([model.log_prob(c) for c in pts.split(2500)])
    return side.numpy(), lp.exp().reshape(npts, npts).cpu().numpy()


def plot_samples(x: torch.Tensor, path: str | Path, is_image: bool, labels: torch.Tensor | None = None,
                 nrow: int = 8, title: str | None = None) -> Path:
    """Samples as an image grid (images; with ``labels``, ``nrow`` per class row) or as a scatter
    plot / histogram (vectors; coloured by ``labels``)."""
    x = x.detach().float().cpu()
    if is_image:
        return save_image_grid(x, path, nrow=nrow, title=title)
    pts = x.numpy()
    groups = [(None, np.ones(len(pts), dtype=bool))] if labels is None else \
        [(int(c), (labels.cpu() == c).numpy()) for c in torch.unique(labels.cpu())]
    fig, ax = plt.subplots(figsize=(4, 4))
    for c, sel in groups:
        if pts.shape[1] >= 2:
            ax.scatter(pts[sel, 0], pts[sel, 1], s=2 if c is None else 4, label=None if c is None else str(c))
        else:
            ax.hist(pts[sel, 0], bins=60 if c is None else 30, alpha=1.0 if c is None else 0.5,
                    label=None if c is None else str(c))
    if labels is not None:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def class_conditional_samples(model, bundle, fig_dir: str | Path, n_samples: int, title: str = "") -> Path:
    """``class_conditional_samples.png``: ``n_samples`` samples spread over the classes, one row per
    class (images) or points coloured by class (vectors)."""
    k = model.prior.num_classes
    per_class = max(1, math.ceil(n_samples / k))
    was = model.training
    model.eval()
    try:
        y = torch.arange(k).repeat_interleave(per_class)
        x = model.sample(len(y), y)
    finally:
        model.train(was)
    return plot_samples(x, Path(fig_dir) / "class_conditional_samples.png", bundle.is_image, labels=y,
                        nrow=per_class, title=f"{title}: one row per class" if bundle.is_image else None)


def density_figures(model, bundle, fig_dir: str | Path, n_samples: int, title: str = "",
                    device=None, dtype=None) -> None:
    """Density heat map + samples (2-D), density curve (1-D), sample grid (images); ``n_samples``
    samples are drawn."""
    fig_dir = Path(fig_dir)
    was = model.training
    model.eval()
    try:
        if bundle.is_image:
            samples = model.sample(n_samples).float()
            save_image_grid(samples.cpu(), fig_dir / "samples.png", nrow=8, title=f"{title} samples")
        elif bundle.dim == 2:
            test = model_scale(bundle, bundle.test.x[:2000]).numpy()  # the model's (standardised) scale
            lim = float(np.ceil(np.abs(test).max() + 0.5))
            side, dens = density_2d(model, lim, 100, device, dtype)
            samples = model.sample(n_samples).cpu().numpy()
            fig, axes = plt.subplots(1, 3, figsize=(12, 4))
            axes[0].scatter(test[:, 0], test[:, 1], s=1)
            axes[0].set_title("data")
            axes[1].imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
            axes[1].set_title("model density")
            axes[2].scatter(samples[:, 0], samples[:, 1], s=1, c="C1")
            axes[2].set_title(f"model samples ({n_samples})")
            for a in axes:
                a.set_xlim(-lim, lim)
                a.set_ylim(-lim, lim)
                a.set_aspect("equal")
            fig.tight_layout()
            fig.savefig(fig_dir / "density.png", dpi=110)
            plt.close(fig)
        elif bundle.dim == 1:
            xs = torch.linspace(-8, 8, 400, dtype=dtype, device=device).unsqueeze(1)
            with torch.no_grad():
                dens = model.log_prob(xs).exp().cpu().numpy()
            fig, ax = plt.subplots(figsize=(5, 3.4))
            ax.hist(model_scale(bundle, bundle.test.x)[:, 0].numpy(), bins=100, density=True, alpha=0.4, label="data")
            ax.plot(xs[:, 0].cpu().numpy(), dens, label="model")
            ax.legend()
            fig.tight_layout()
            fig.savefig(fig_dir / "density.png", dpi=110)
            plt.close(fig)
    finally:
        model.train(was)


def tolerance_figures(log_path: str | Path, fig_dir: str | Path, names: list[str], eval_records,
                      min_tol: float, max_tol: float) -> None:
    """``tolerances.png`` (each block's sampled tolerance over training) and
    ``tolerance_distribution.png`` (its distribution over the second half of training and over the
    test set; InfoCNF Figure 2b). ``eval_records`` are ``(block index, mu, sigma)`` of log10 tol."""
    fig_dir = Path(fig_dir)
    log = read_log(log_path)
    if log:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for n in names:
            if f"tol.{n}" in log:
                ax.plot(log["iteration"], log[f"tol.{n}"], lw=0.8, label=n)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("sampled tolerance")
        ax.set_title("learned solver tolerance per block")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / "tolerances.png", dpi=120)
        plt.close(fig)
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    lo, hi = math.log10(min_tol), math.log10(max_tol)
    half = len(log.get("iteration", [])) // 2
    for i, name in enumerate(names):
        ax = axes[0, i]
        train = log.get(f"tol.{name}", np.array([]))[half:]
        train = np.log10(train[np.isfinite(train)])
        if len(train):
            ax.hist(train, bins=30, alpha=0.6, density=True, label="train")
        test = [rng.normal(mu, s, 200) for j, mu, s in eval_records if j == i]
        if test:
            ax.hist(np.clip(np.concatenate(test), lo, hi), bins=30, alpha=0.6, density=True, label="test")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("log10 tolerance")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "tolerance_distribution.png", dpi=120)
    plt.close(fig)


def plot_trajectories(x: torch.Tensor, direction: torch.Tensor, x_pred: torch.Tensor, n_observed: int,
                      title: str = "", axes=None, path: str | Path | None = None):
    """LatentODE spirals, each in its own panel: ground truth (grey), observations (dots),
    reconstruction (solid) and extrapolation (dashed). Returns the figure (saved and closed when
    ``path`` is given)."""
    k = len(x)
    if axes is None:
        fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
        axes = axes[0]
    else:
        fig = axes[0].figure
    for i, ax in enumerate(axes[:k]):
        ax.plot(x[i, :, 2], x[i, :, 3], color="0.7", lw=1, label="truth")
        ax.scatter(x[i, :n_observed, 0], x[i, :n_observed, 1], s=2, color="0.4", label="observed")
        ax.plot(x_pred[i, :n_observed, 0], x_pred[i, :n_observed, 1], color="C0", lw=1.5, label="reconstruction")
        ax.plot(x_pred[i, n_observed - 1:, 0], x_pred[i, n_observed - 1:, 1], "--", color="C3", lw=1.5,
                label="extrapolation")
        ax.set_title(("ccw" if int(direction[i]) else "cw"), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=5, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig

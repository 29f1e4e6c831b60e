"""Figures (matplotlib, Agg backend): training curves, 2-D densities and samples, image grids."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["training_curves", "density_figures", "image_grid", "save_image_grid", "density_2d"]


def _read_log(path: Path) -> dict[str, np.ndarray]:
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
    """``training_curves.png``: loss (NLL or bits/dim), NFE forward/backward, end time per block."""
    log = _read_log(Path(log_path))
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


def density_figures(trainer, fig_dir: str | Path) -> None:
    """Density heat map + samples (2-D), density curve (1-D), sample grid (images)."""
    model, bundle, cfg = trainer.model, trainer.bundle, trainer.cfg
    fig_dir = Path(fig_dir)
    was = model.training
    model.eval()
    try:
        if bundle.is_image:
            samples = model.sample(cfg.eval.n_samples, generator=None).float()
            save_image_grid(samples.cpu(), fig_dir / "samples.png", nrow=8, title=f"{cfg.recipe} samples")
        elif bundle.dim == 2:
            test = bundle.test.x[:2000].numpy()
            lim = float(np.ceil(np.abs(test).max() + 0.5))
            side, dens = density_2d(model, lim, 100, trainer.device, trainer.dtype)
            samples = model.sample(1000).cpu().numpy()
            fig, axes = plt.subplots(1, 3, figsize=(12, 4))
            axes[0].scatter(test[:, 0], test[:, 1], s=1)
            axes[0].set_title("data")
            axes[1].imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
            axes[1].set_title("model density")
            axes[2].scatter(samples[:, 0], samples[:, 1], s=1, c="C1")
            axes[2].set_title("model samples")
            for a in axes:
                a.set_xlim(-lim, lim)
                a.set_ylim(-lim, lim)
                a.set_aspect("equal")
            fig.tight_layout()
            fig.savefig(fig_dir / "density.png", dpi=110)
            plt.close(fig)
        elif bundle.dim == 1:
            xs = torch.linspace(-8, 8, 400, dtype=trainer.dtype, device=trainer.device).unsqueeze(1)
            with torch.no_grad():
                dens = model.log_prob(xs).exp().cpu().numpy()
            fig, ax = plt.subplots(figsize=(5, 3.4))
            ax.hist(bundle.test.x[:, 0].numpy(), bins=100, density=True, alpha=0.4, label="data")
            ax.plot(xs[:, 0].cpu().numpy(), dens, label="model")
            ax.legend()
            fig.tight_layout()
            fig.savefig(fig_dir / "density.png", dpi=110)
            plt.close(fig)
    finally:
        model.train(was)

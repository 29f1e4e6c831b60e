"""The same computations on a CUDA device as on the CPU (skipped without one; benchmarks/gpu_check.sh
runs them on a GPU): a multiscale conv CNF's bits/dim (exact dequantised input, fixed Hutchinson
noise, dopri5 1e-5) and a training step's gradients, direct and adjoint, agree with the CPU's in float64."""
from __future__ import annotations

import pytest
import torch

from fastcnf import Trainer, build_model, load_data, load_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMALL = ["data.name=digits", "model.num_blocks=1", "model.hidden_dims=[8,8]", "train.batch_size=16",
         "threads=1", "eval.figures=false", "train.checkpoint_every=0"]


def _loss_and_grads(cfg, device):
    bundle = load_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg, bundle).to(device, torch.float64)
    x = (bundle.train.x[:16].double() + 0.5) / bundle.levels
    torch.manual_seed(1)
    loss = model.bits_per_dim(x.to(device)).mean()
    loss.backward()
    return float(loss), [p.grad.detach().cpu() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("adjoint", [False, True])
def test_conv_cnf_loss_and_gradients_match_the_cpu(adjoint):
    cfg = load_recipe("mnist-ffjord", SMALL + [f"solver.gradient={'adjoint' if adjoint else 'auto'}", "model.divergence=exact"])
    loss_cpu, grads_cpu = _loss_and_grads(cfg, torch.device("cpu"))
    loss_gpu, grads_gpu = _loss_and_grads(cfg, torch.device("cuda"))
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-6)
    for a, b in zip(grads_cpu, grads_gpu, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_trainer_runs_on_cuda(tmp_path):
    cfg = load_recipe("digits-fast", SMALL + ["device=cuda", "train.iterations=2"])
    metrics = Trainer(cfg, tmp_path, progress=False).fit()
    assert metrics["iterations"] == 2 and torch.isfinite(torch.tensor(metrics["test_bits_per_dim"]))

"""Reflow and distillation: pairs reproducible from the seed, resumed pair generation equal to an
uninterrupted one, the fixed pairs reaching flow matching's loss unchanged, and a reflowed model
recovering the straight (affine) map of a Gaussian-to-Gaussian problem whose teacher flow is curved."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastcnf.cli import main
from fastcnf.cnf import CNFBlock
from fastcnf.config import ConfigError
from fastcnf.methods import load_recipe
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.reflow import GridTime, generate_pairs, load_pairs
from fastcnf.reflow import pairs as pairs_module
from fastcnf.training.trainer import Trainer

ALPHA = (0.7, -0.5)  # dz/dt = alpha z + beta(t): an affine end map along curved trajectories
RADIUS = 1.5
K = 2 * math.pi


class CurvedAffineField(nn.Module):
    """``f(t, z) = alpha * z + RADIUS * (cos 2 pi t, sin 2 pi t)``: data (t = 0) to noise (t = 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(ALPHA, dtype=torch.float64), requires_grad=False)

    def forward(self, t, z):
        beta = RADIUS * torch.stack([torch.cos(K * t), torch.sin(K * t)]).to(z)
        return self.alpha.to(z) * z + beta


def straight_map(z: torch.Tensor) -> torch.Tensor:
    """The teacher's exact noise -> data map: ``x = exp(-alpha) (z - c)``,
    ``c = int_0^1 exp(alpha (1 - s)) beta(s) ds`` in closed form."""
    a = torch.tensor(ALPHA, dtype=torch.float64)
    c = torch.tensor([RADIUS * (math.exp(ALPHA[0]) - 1) * ALPHA[0] / (K ** 2 + ALPHA[0] ** 2),
                      RADIUS * (math.exp(ALPHA[1]) - 1) * K / (K ** 2 + ALPHA[1] ** 2)], dtype=torch.float64)
    return torch.exp(-a) * (z.double() - c)


def teacher() -> FlowModel:
    return FlowModel(SequentialFlow([CNFBlock(CurvedAffineField(), end_time=1.0)], input_shape=(2,))).double()


def test_teacher_pairs_follow_the_closed_form_map(tmp_path):
    path = generate_pairs(teacher(), 64, tmp_path, seed=3, chunk_size=32, progress=False)
    arrays = load_pairs(path)
    expected = straight_map(torch.from_numpy(arrays["noise"]))
    np.testing.assert_allclose(arrays["data"], expected.numpy(), atol=1e-3)


def test_pairs_are_reproducible_from_the_seed(tmp_path):
    a = load_pairs(generate_pairs(teacher(), 50, tmp_path / "a", seed=7, chunk_size=16, progress=False))
    b = load_pairs(generate_pairs(teacher(), 50, tmp_path / "b", seed=7, chunk_size=16, progress=False))
    c = load_pairs(generate_pairs(teacher(), 50, tmp_path / "c", seed=8, chunk_size=16, progress=False))
    for key in ("noise", "data"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["noise"], c["noise"])


def test_resumed_pair_generation_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    full = load_pairs(generate_pairs(teacher(), 40, tmp_path / "full", seed=1, chunk_size=10, progress=False))
    draw = pairs_module._draw_chunk
    calls = []

    def interrupted(model, n, generator):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(n)
        return draw(model, n, generator)

    monkeypatch.setattr(pairs_module, "_draw_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(teacher(), 40, tmp_path / "part", seed=1, chunk_size=10, progress=False)
    assert len(list((tmp_path / "part" / "pairs_chunks").glob("chunk_*.npz"))) == 2
    monkeypatch.setattr(pairs_module, "_draw_chunk", lambda m, n, g: (calls.append(n), draw(m, n, g))[1])
    resumed = load_pairs(generate_pairs(teacher(), 40, tmp_path / "part", seed=1, chunk_size=10, progress=False))
    assert len(calls) == 4  # two chunks before the interruption, the missing two after it
    for key in ("noise", "data", "labels"):
        np.testing.assert_array_equal(full[key], resumed[key])


def test_grid_time_draws_the_euler_grid():
    t = GridTime(3)(3000, generator=torch.Generator().manual_seed(0))
    values, counts = torch.unique(t, return_counts=True)
    torch.testing.assert_close(values, torch.tensor([1 / 3, 2 / 3, 1.0]))
    assert counts.min() > 900


@pytest.mark.parametrize("k", [1, 2, 4])
def test_grid_times_are_the_times_the_k_step_euler_sampler_evaluates(k):
    """Distillation to k steps trains exactly where a k-step Euler decode evaluates the network,
    and the straight path's target there makes those k steps land on the paired endpoint."""
    from fastcnf.flow_matching.paths import IndependentCFMPath
    from fastcnf.ode.fixed_step import fixed_steps

    seen = []

    class Recording(nn.Module):
        def forward(self, t, z):
            seen.append(float(t))
            return torch.zeros_like(z)

    model = FlowModel(SequentialFlow([CNFBlock(Recording(), end_time=1.0)], input_shape=(2,))).double()
    with torch.no_grad(), fixed_steps(model, "euler", k):
        model.decode(torch.zeros(3, 2, dtype=torch.float64))
    grid = torch.unique(GridTime(k)(200 * k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(sorted(seen), grid.numpy(), atol=1e-12)
    # Euler from the noise with the path's target velocity at the path's own grid points ends on x
    path, gen = IndependentCFMPath(0.0), torch.Generator().manual_seed(1)
    x, z = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    h = z.clone()
    for t in sorted(seen, reverse=True):
        tt = torch.full((5,), t, dtype=torch.float64)
        torch.testing.assert_close(h, path.mean(x, z, tt))
        h = h - path.velocity(x, z, tt) / k
    torch.testing.assert_close(h, x)


def _student(tmp_path: Path, pairs: Path, iterations: int, extra=()):
    return load_recipe("toy-fm", [
        f"reflow.pairs={pairs}", "model.hidden_dims=[64,64]", f"train.iterations={iterations}",
        "train.batch_size=256", "train.lr=3e-3", "data.n_test=64", "eval.figures=false", "threads=1",
        "train.checkpoint_every=0", "dtype=float64", *extra])


def test_reflow_recovers_the_straight_map_of_gaussian_to_gaussian(tmp_path):
    pairs = generate_pairs(teacher(), 4000, tmp_path, seed=0, chunk_size=4000, progress=False)
    torch.manual_seed(0)
    trainer = Trainer(_student(tmp_path, pairs, 600), tmp_path / "student", progress=False)
    trainer.fit()
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = straight_map(z)
    student = trainer.model.eval()
    with torch.no_grad():
        from fastcnf.ode.fixed_step import fixed_steps

        with fixed_steps(student, "euler", 1):
            one_step = student.decode(z)
        t = teacher()
        with fixed_steps(t, "euler", 1):
            teacher_one_step = t.decode(z)
    student_err = float((one_step - exact).norm(dim=1).mean())
    teacher_err = float((teacher_one_step - exact).norm(dim=1).mean())
    assert student_err < 0.1 and student_err < 0.1 * teacher_err


def test_fixed_pairs_reach_the_flow_matching_loss_unchanged(tmp_path, monkeypatch):
    """The objective sees the pairs' own noise and data, not fresh prior draws."""
    pairs = generate_pairs(teacher(), 64, tmp_path, seed=0, chunk_size=64, progress=False)
    arrays = load_pairs(pairs)
    seen = {}
    from fastcnf.flow_matching import objective as objectives

    def spy(net, x, noise, path, coupling, time_sampler, labels=None):
        seen["x"], seen["noise"], seen["coupling"] = x, noise, coupling
        return (net(torch.zeros(()), x) * 0).sum()

    monkeypatch.setattr(objectives, "flow_matching_loss", spy)
    trainer = Trainer(_student(tmp_path, pairs, 1, ["flow_matching.coupling=exact", "train.batch_size=16"]),
                      tmp_path / "s", progress=False)
    trainer.train_step()
    data, noise = torch.from_numpy(arrays["data"]).double(), torch.from_numpy(arrays["noise"]).double()
    for x, n in zip(seen["x"], seen["noise"]):
        i = int((data - x).norm(dim=1).argmin())
        assert float((data[i] - x).norm()) == 0.0 and float((noise[i] - n).norm()) == 0.0
    assert type(seen["coupling"]).__name__ == "IndependentCoupling"


def test_reflow_needs_flow_matching(tmp_path):
    """An objective that draws its own noise (maximum likelihood) cannot train on the pairs: the
    run stops before training with one line naming the objective."""
    with pytest.raises(ConfigError, match="flow-matching objective"):
        Trainer(load_recipe("toy-ffjord", [f"reflow.pairs={tmp_path / 'x.npz'}", "threads=1"]), tmp_path / "r",
                progress=False)


def test_cli_reflow_distill_and_fixed_step_eval(tmp_path, capsys):
    fast = ["model.hidden_dims=[8,8]", "data.n_test=50", "eval.batch_size=50", "eval.atol=1e-3", "eval.rtol=1e-3",
            "threads=1", "eval.figures=false"]
    assert main(["train", "toy-fm", "--out", str(tmp_path / "fm"), "--quiet",
                 "--set", "train.iterations=3", *fast]) == 0
    assert main(["reflow", str(tmp_path / "fm"), "--out", str(tmp_path / "r1"), "--recipe", "toy-reflow",
                 "--pairs", "300", "--chunk-size", "100", "--quiet",
                 "--set", "train.iterations=3", "train.batch_size=64", *fast]) == 0
    metrics = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert metrics["reflow"]["pairs"] == 300 and metrics["test_nll_nats"] is not None
    # 2-rectified from the 1-rectified run, then distilled to one step
    assert main(["reflow", str(tmp_path / "r1"), "--out", str(tmp_path / "r2"), "--pairs", "100", "--quiet"]) == 0
    assert main(["distill", str(tmp_path / "r2"), "--steps", "1", "--out", str(tmp_path / "d1"), "--pairs", "100",
                 "--quiet"]) == 0
    cfg = json.loads((tmp_path / "d1" / "metrics.json").read_text())["reflow"]
    assert cfg["grid_steps"] == 1
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "d1"), "--steps", "2", "--method", "rk4"]) == 0
    fixed = json.loads((tmp_path / "d1" / "metrics.json").read_text())["fixed_steps"]["rk4-2"]
    assert fixed["eval_nfe_forward"] == 8
    assert main(["sample", str(tmp_path / "d1"), "--steps", "1", "--n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    assert "1 function evaluations" in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["distill", str(tmp_path / "r2"), "--steps", "0", "--out", str(tmp_path / "d0")]) == 2
    assert main(["sample", str(tmp_path / "d1"), "--steps", "0", "--out", str(tmp_path / "s.npy")]) == 2


def test_class_conditional_pairs_keep_their_label(tmp_path, capsys):
    fast = ["data.name=mix1d", "conditioning.kind=ccnf", "model.hidden_dims=[8,8]", "data.n_test=50",
            "eval.batch_size=50", "eval.atol=1e-3", "eval.rtol=1e-3", "threads=1", "eval.figures=false",
            "eval.sample_accuracy_per_class=5"]
    assert main(["train", "toy-fm", "--out", str(tmp_path / "fm"), "--quiet", "--set", "train.iterations=2", *fast]) == 0
    assert main(["reflow", str(tmp_path / "fm"), "--out", str(tmp_path / "r1"), "--pairs", "400", "--quiet",
                 "--set", "train.iterations=2", "train.batch_size=64"]) == 0
    arrays = load_pairs(tmp_path / "r1" / "pairs.npz")
    assert arrays["labels"].shape == (400,) and set(arrays["labels"].tolist()) == {0, 1, 2}
    # each noise was drawn from its label's source N(mu_y, I): Bayes' rule on the source reads the label back
    from fastcnf.cli import _load_run

    _, _, _, model = _load_run(str(tmp_path / "r1"), [])
    scores = model.prior.classify(torch.from_numpy(arrays["noise"]))
    assert float((scores.argmax(1).numpy() == arrays["labels"]).mean()) > 0.9
    # the student's prior is the teacher's source
    _, _, _, teacher = _load_run(str(tmp_path / "fm"), [])
    for a, b in zip(model.prior.state_dict().values(), teacher.prior.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_pairs_refuse_gradient_accumulation(tmp_path):
    pairs = generate_pairs(teacher(), 64, tmp_path, seed=0, chunk_size=64, progress=False)
    with pytest.raises(ConfigError, match="accumulation"):
        Trainer(_student(tmp_path, pairs, 1, ["train.accumulation_steps=2", "train.batch_size=16"]),
                tmp_path / "s", progress=False)


def test_rerunning_reflow_continues_the_run_and_keeps_the_pairs(tmp_path):
    fast = ["model.hidden_dims=[8,8]", "data.n_test=50", "eval.batch_size=50", "eval.atol=1e-3", "eval.rtol=1e-3",
            "threads=1", "eval.figures=false"]
    assert main(["train", "toy-fm", "--out", str(tmp_path / "fm"), "--quiet", "--set", "train.iterations=2", *fast]) == 0
    args = ["reflow", str(tmp_path / "fm"), "--out", str(tmp_path / "r1"), "--pairs", "200", "--quiet", "--set",
            "train.batch_size=32", "train.checkpoint_every=1"]
    assert main([*args, "train.iterations=2"]) == 0
    before = (tmp_path / "r1" / "pairs.npz").read_bytes()
    assert main([*args, "train.iterations=5"]) == 0
    assert (tmp_path / "r1" / "pairs.npz").read_bytes() == before
    log = (tmp_path / "r1" / "log.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4", "5"]  # continued, not restarted
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["iterations"] == 5


def test_student_starts_from_the_weights_the_pairs_came_from(tmp_path):
    """A teacher that kept a moving average of its weights draws its pairs with the average
    (what ``eval`` and ``sample`` use), so the student starts from the average, not the last step."""
    fast = ["model.hidden_dims=[8,8]", "data.n_test=50", "eval.batch_size=50", "eval.atol=1e-3", "eval.rtol=1e-3",
            "threads=1", "eval.figures=false", "train.ema_decay=0.5", "train.lr=0.1"]
    assert main(["train", "toy-fm", "--out", str(tmp_path / "fm"), "--quiet", "--set", "train.iterations=4", *fast]) == 0
    state = torch.load(tmp_path / "fm" / "checkpoints" / "last.pt", weights_only=True)
    average = {**state["model"], **state["ema"]["average"]}
    moved = [k for k, v in state["ema"]["average"].items() if not torch.equal(v, state["model"][k])]
    assert moved  # the average differs from the last weights
    from fastcnf.pipelines.reflow import student_config

    pairs = generate_pairs(teacher().float(), 64, tmp_path / "r", seed=0, chunk_size=64, progress=False)
    cfg = student_config(tmp_path / "fm", tmp_path / "r", overrides=[f"reflow.pairs={pairs}", "train.batch_size=16"])
    student = Trainer(cfg, tmp_path / "r", progress=False).model
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, average[k], rtol=0, atol=0)

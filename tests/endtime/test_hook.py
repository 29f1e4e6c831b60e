"""TO-FLOW and STEER in the trainer (fastcnf.training.endtime; Du et al. 2022, "TO-FLOW", Algorithm 1): the temporal step moves T and only T, the main
optimiser never moves T, clipping (eq. 17) holds at every step; configuration errors are clear."""
from __future__ import annotations

import pytest
import torch

from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime
from fastcnf.config import ConfigError, list_recipes
from fastcnf.methods import load_recipe
from fastcnf.data.base import DataError
from fastcnf.data import load_data
from fastcnf.endtime.hook import EndTimeHook
from fastcnf.training.trainer import Trainer

TINY = ["model.hidden_dims=[8]", "solver.atol=1e-3", "solver.rtol=1e-3", "eval.atol=1e-3", "eval.rtol=1e-3",
        "data.n_train=200", "data.n_test=100", "eval.batch_size=100", "train.batch_size=32",
        "train.checkpoint_every=0", "eval.n_samples=4"]


def _trainer(tmp_path, recipe="toy-toflow", extra=(), iterations=3):
    cfg = load_recipe(recipe, TINY + [f"train.iterations={iterations}", *extra])
    return Trainer(cfg, tmp_path, progress=False)


def _hook(trainer) -> EndTimeHook:
    return next(h for h in trainer.hooks if isinstance(h, EndTimeHook))


def test_temporal_step_changes_T_and_only_T(tmp_path):
    tr = _trainer(tmp_path)
    hook = _hook(tr)
    T = tr.model.cnf_blocks()[0].end_time
    assert all(T is not p for g in tr.optimizer.param_groups for p in g["params"])  # excluded
    ctx = {"x": tr.batcher.next()[0].to(tr.dtype), "y": None}
    tr.task.step(tr.model, ctx)
    loss = ctx["loss"] + hook.loss_terms(tr, ctx)["temporal_reg"]
    loss.backward()
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    T_before, grad = float(T.detach()), float(T.grad)
    hook.step_end_time()
    after = tr.model.state_dict()
    for k, v in before.items():
        if k.endswith("end_time"):
            continue
        assert torch.equal(v, after[k]), f"{k} moved in the temporal step"
    # Adam's first step has magnitude lr (1e-2) against the gradient's sign
    assert float(T.detach()) == pytest.approx(T_before - 1e-2 * (1 if grad > 0 else -1), abs=1e-6)


def test_network_step_does_not_move_T(tmp_path):
    tr = _trainer(tmp_path)
    hook = _hook(tr)
    hook.step_end_time = lambda: None  # only Algorithm 1's network step
    T_before = float(tr.model.cnf_blocks()[0].end_time.detach())
    net_before = [p.detach().clone() for p in tr.model.cnf_blocks()[0].net.parameters()]
    tr.train_step()
    assert float(tr.model.cnf_blocks()[0].end_time.detach()) == T_before
    assert any(not torch.equal(a, b) for a, b in zip(net_before, tr.model.cnf_blocks()[0].net.parameters()))


def test_clipping_holds_at_every_step(tmp_path):
    # a huge temporal learning rate and regulariser push T down hard: eq. 17 keeps it in [eps, 2 T0 - eps]
    tr = _trainer(tmp_path, extra=["endtime.lr=0.3", "endtime.alpha=50.0"])
    Ts = []
    for _ in range(3):
        tr.train_step()
        Ts.append(tr.model_end_times()["cnf0"])
    assert all(0.1 - 1e-7 <= t <= 0.9 + 1e-7 for t in Ts)
    assert min(Ts) == pytest.approx(0.1, abs=1e-6)  # it did hit the bound
    policy = LearnedEndTime(0.5, clip_eps=0.1)
    hook = EndTimeHook(load_recipe("toy-toflow", ["endtime.lr=1.0"]))
    hook.learned = {"b": policy}
    hook.optimizer = torch.optim.Adam([policy.end_time], lr=1.0)
    for sign in (1, 1, 1, -1, -1, -1, -1, -1, -1):
        policy.end_time.grad = torch.tensor(float(sign))
        hook.step_end_time()
        assert 0.1 - 1e-7 <= float(policy.end_time.detach()) <= 0.9 + 1e-7


def test_resume_restores_the_temporal_optimiser(tmp_path):
    tr = _trainer(tmp_path, iterations=2)
    tr.train_step()
    tr.iteration = 1
    tr.save()
    m1 = tr.state_dict()["own_optimizers"]["endtime.0"]["state"][0]["exp_avg"]
    assert float(m1) != 0  # Adam moments exist and are saved
    tr2 = _trainer(tmp_path, iterations=2)
    tr2._resume()
    assert torch.equal(_hook(tr2).own.state_dict()["state"][0]["exp_avg"], m1)
    assert tr2.model_end_times() == tr.model_end_times()


def test_steer_run_logs_sampled_T_and_keeps_T0(tmp_path):
    tr = _trainer(tmp_path, recipe="toy-steer")
    hook = _hook(tr)
    sampled = []
    for _ in range(3):
        ctx = tr.train_step()
        sampled.append(hook.log_values(tr, ctx)["T_sampled.cnf0"])
    assert all(0.25 <= s <= 0.75 for s in sampled) and len(set(sampled)) == 3
    assert tr.model_end_times()["cnf0"] == 0.5
    assert "T_sampled.cnf0" in tr.log_columns


def test_eps_at_or_above_T0_and_bad_policies_are_clear_errors():
    for eps in (0.5, 0.7):
        with pytest.raises(ValueError, match="empty interval"):
            LearnedEndTime(0.5, clip_eps=eps)
    for t0 in (0.0, -0.5, float("inf")):
        with pytest.raises(ValueError, match="positive"):
            LearnedEndTime(t0)
    with pytest.raises(ValueError, match="steer_b"):
        RandomEndTime(0.5, half_width=0.5)
    # the same mistakes in a configuration are caught when it loads (tests/config/test_schema.py)
    with pytest.raises(ConfigError, match="must be below T0"):
        load_recipe("toy-toflow", ["endtime.clip_eps=0.5"])
    with pytest.raises(ConfigError, match="conflicts"):
        load_recipe("toy-toflow", ["model.train_end_time=true"])


def test_recipes_load_and_image_recipes_fail_cleanly_without_data(tmp_path):
    names = ["toy-toflow", "toy-steer", "toy-rnode", "digits-toflow", "mnist-ffjord", "mnist-toflow",
             "mnist-steer", "fmnist-toflow", "cifar10-toflow"]
    assert set(names) <= set(list_recipes())
    policies = {n: load_recipe(n).endtime.policy for n in names}
    assert policies["mnist-toflow"] == "toflow" and policies["mnist-steer"] == "steer"
    assert load_recipe("toy-rnode").model.kinetic_weight > 0
    assert load_recipe("mnist-toflow").model.end_time == 1.0 and load_recipe("toy-toflow").model.end_time == 0.5
    for n in ("fmnist-toflow", "cifar10-toflow"):
        cfg = load_recipe(n, [f"data.root={tmp_path}"])
        with pytest.raises(DataError):
            load_data(cfg.data, 0)


EXACT = ["dtype=float64", "solver.atol=1e-9", "solver.rtol=1e-9", "train.weight_decay=0", "model.hidden_dims=[8]",
         "data.n_train=64", "train.batch_size=16", "train.checkpoint_every=0", "train.iterations=1", "threads=1"]


def test_algorithm1_steps_T_on_eq12_at_the_updated_weights(tmp_path):
    """TO-FLOW Algorithm 1: after the weights' update, dL/dT = <z(T)/B, f_new(z(T), T)> - mean Tr
    df_new/dz (one block, standard normal prior, L = -mean log p(x)), checked against a Jacobian
    computed by torch.autograd.functional.jacobian, plus alpha sign(T)."""
    import copy

    tr = Trainer(load_recipe("toy-toflow", EXACT + ["train.lr=0.05"]), tmp_path, progress=False)
    hook = _hook(tr)
    assert hook.order == "algorithm1"
    old = copy.deepcopy(tr.model)
    state = tr.batcher.state_dict()
    x = tr.batcher.next()[0].to(torch.float64)
    tr.batcher.load_state_dict(state)
    tr.train_step()
    with torch.no_grad():
        z, _ = old.flow(x)  # the end state of the iteration's one solve (weights before the update)
    block = tr.model.cnf_blocks()[0]
    T = torch.tensor(hook.learned[block.name].T0, dtype=torch.float64)  # T before its own step
    net = block.net
    b = x.shape[0]
    f = net(T, z).detach()
    traces = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: net(T, v[None])[0], zi))
                          for zi in z])
    reference = float((z / b * f).sum() - traces.mean()) + 0.1 * 1.0
    assert hook.last_grad[block.name] == pytest.approx(reference, rel=1e-5)
    assert "T_grad_norm" in tr.log_columns and "T_clipped_fraction" in tr.log_columns


def test_algorithm1_and_simultaneous_orders_coincide_when_the_weights_do_not_move(tmp_path):
    """The two orders differ only through the weights' update: with a vanishing learning rate the T
    gradient of Algorithm 1 (eq. 12-13 at the end state) equals autograd's dL/dT of the backward pass."""
    grads = {}
    for order in ("algorithm1", "simultaneous"):
        tr = Trainer(load_recipe("toy-toflow", EXACT + ["train.lr=1e-12", f"endtime.order={order}"]),
                     tmp_path / order, progress=False)
        tr.train_step()
        grads[order] = _hook(tr).last_grad["cnf0"]
    assert grads["algorithm1"] == pytest.approx(grads["simultaneous"], rel=1e-5)

"""Training by parts (fastcnf.training.parts): gradient isolation, the truncated objective, schedules, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcnf.config import ConfigError
from fastcnf.methods import load_recipe
from fastcnf.flows.glow import build_glow, initialize_actnorm
from fastcnf.models.flow_model import FlowModel
from fastcnf.parts.hook import PartsHook, level_position_to_index, resolve_boundaries, truncated_forward
from fastcnf.training.trainer import Trainer

DT = torch.float64


def tiny_glow(seed: int = 0) -> FlowModel:
    """2 levels x 2 steps on 1x8x8 (steps: shift, squeeze, 2 x GlowStep, split, squeeze, 2 x GlowStep),
    actnorms initialised, every parameter perturbed (so zero-init convolutions are not trivially 0)."""
    torch.manual_seed(seed)
    model = FlowModel(build_glow((1, 8, 8), levels=2, steps=2, hidden=8), levels=17).double()
    initialize_actnorm(model, torch.rand(32, 1, 8, 8, dtype=DT))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def part_parameters(model: FlowModel, starts: list[int]) -> list[list[tuple[str, nn.Parameter]]]:
    out = []
    for a, b in zip(starts, starts[1:]):
        out.append([(f"steps.{i}.{n}", p) for i in range(a, b) for n, p in model.flow.steps[i].named_parameters()])
    return out


def truncated_nll(model: FlowModel, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    z, logdet = truncated_forward(model, x, start, stop)
    return -(model.prior.log_prob(z) + logdet).mean()


def test_level_notation_maps_fractional_levels_to_step_indices():
    flow = tiny_glow().flow
    assert flow.level_boundaries == [0, 5]
    assert level_position_to_index(flow, 2) == 5          # "by blocks": the start of level 2
    assert level_position_to_index(flow, 1.5) == 3        # 1_{1/2}: after the first of level 1's 2 steps
    assert level_position_to_index(flow, 2.5) == 7        # 2_{1/2}
    assert resolve_boundaries(flow, level_boundaries=[1.5, 2, 2.5]) == [0, 3, 5, 7, 8]


@pytest.mark.parametrize("boundaries", [[3], [5], [3, 5, 7]])
def test_no_gradient_reaches_earlier_parts_from_a_later_parts_loss(boundaries):
    model = tiny_glow()
    starts = resolve_boundaries(model.flow, boundaries=boundaries)
    params = part_parameters(model, starts)
    x = torch.rand(6, 1, 8, 8, dtype=DT)
    for k in range(1, len(starts) - 1):
        model.zero_grad(set_to_none=True)
        truncated_nll(model, x, starts[k], starts[k + 1]).backward()
        for j, group in enumerate(params):
            for name, p in group:
                if j == k:
                    assert p.grad is not None, f"part {k}'s own parameter {name} got no gradient"
                else:  # earlier parts: detached input; later parts: not run
                    assert p.grad is None, f"part {k}'s loss reached {name} of part {j}"
    # the part's own gradient is not all zero (the objective really trains it)
    last = params[len(starts) - 2]
    assert any(float(p.grad.abs().sum()) > 0 for _, p in last)


def test_truncated_objective_of_last_part_equals_full_objective():
    model = tiny_glow()
    x = torch.rand(6, 1, 8, 8, dtype=DT)
    starts = resolve_boundaries(model.flow, boundaries=[3, 5])
    z_full, logdet_full = model(x)
    z, logdet = truncated_forward(model, x, starts[-2], starts[-1])
    assert torch.allclose(z, z_full, atol=1e-12) and torch.allclose(logdet, logdet_full, atol=1e-10)
    # and the gradient w.r.t. the last part is the full objective's gradient w.r.t. it
    last = [p for i in range(starts[-2], starts[-1]) for p in model.flow.steps[i].parameters()]
    full_loss = -(model.prior.log_prob(z_full) + logdet_full).mean()
    g_full = torch.autograd.grad(full_loss, last)
    g_part = torch.autograd.grad(truncated_nll(model, x, starts[-2], starts[-1]), last)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, atol=1e-10)


def test_truncated_objective_is_the_nll_of_the_truncated_flow():
    """Part [0, b)'s loss is -log p of the flow f^{(1:b)} with a standard normal on its full latent."""
    from fastcnf.priors import standard_normal_logprob

    model = tiny_glow()
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    h, logdet, pieces = model.flow.forward_range(x, 0, 5)  # through level 1 and its split
    expected = -(standard_normal_logprob(h) + sum(standard_normal_logprob(p) for p in pieces) + logdet).mean()
    assert torch.allclose(truncated_nll(model, x, 0, 5), expected, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"boundaries": [0]}, "out of range"),
    ({"boundaries": [8]}, "out of range"),
    ({"boundaries": [-2]}, "out of range"),
    ({"boundaries": [5, 3]}, "strictly increasing"),
    ({"boundaries": [3, 3]}, "strictly increasing"),
    ({"level_boundaries": [1.0]}, "out of range"),
    ({"level_boundaries": [3.0]}, "out of range"),
    ({"level_boundaries": [1.1]}, "cuts level 1 after 0"),
    ({}, "needs at least one boundary"),
    ({"boundaries": [3], "level_boundaries": [1.5]}, "not both"),
])
def test_invalid_split_is_a_clear_error(kwargs, message):
    flow = tiny_glow().flow
    with pytest.raises(ConfigError, match=message):
        resolve_boundaries(flow, **kwargs)


def test_level_boundaries_need_a_flow_with_levels():
    from fastcnf.flows.glow import Shift
    from fastcnf.flows.sequential import SequentialFlow

    flow = SequentialFlow([Shift(0.0), Shift(1.0)], (2,))
    with pytest.raises(ConfigError, match="needs a flow with levels"):
        resolve_boundaries(flow, level_boundaries=[1.5])


def tiny_cfg(*overrides: str):
    return load_recipe("digits-glow-parts", [
        "model.glow.steps=2", "model.glow.hidden=4", "train.batch_size=20", "train.iterations=6",
        "parts.finetune=2", "train.checkpoint_every=0", "eval.max_examples=20", "threads=1", *overrides])


def test_setup_errors_name_the_problem(tmp_path):
    # steps are shift, squeeze, 2 x step, split, ...: boundary 1 leaves only the shift in part 0
    with pytest.raises(ConfigError, match="has no trainable parameters"):
        Trainer(tiny_cfg("parts.level_boundaries=[]", "parts.boundaries=[1]"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="lr_scales has 3 entries but the boundaries make 2 parts"):
        Trainer(tiny_cfg("parts.lr_scales=[1, 1, 1]"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="leaves no parts phase"):
        Trainer(tiny_cfg("parts.finetune=6"), tmp_path / "c", progress=False)


def test_alternate_and_sequential_schedules_pick_the_active_part():
    cfg = tiny_cfg("train.iterations=10", "parts.finetune=3", "parts.turn=2", "parts.level_boundaries=[2]")
    hook = PartsHook(cfg)
    hook.starts, hook.phase_iterations, hook.turn_iterations = [0, 4, 9, 12], 7, 2
    assert [hook.active_part(i) for i in range(10)] == [0, 0, 1, 1, 2, 2, 0, None, None, None]
    hook.parts_cfg.mechanism = "sequential"
    assert [hook.active_part(i) for i in range(10)] == [0, 0, 1, 1, 2, 2, 2, None, None, None]


def test_inactive_parts_keep_their_weights_and_adam_state(tmp_path):
    trainer = Trainer(tiny_cfg("parts.lr_scales=[1, 0.5]"), tmp_path, progress=False)
    hook = next(h for h in trainer.hooks if isinstance(h, PartsHook))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["part1"]["lr_scale"] == 0.5 and groups["model"]["params"] == []
    for it in range(4):  # alternate: parts 0, 1, 0, 1
        active = hook.active_part(it)
        before = [[p.detach().clone() for p in ps] for ps in hook.part_params]
        steps_before = [[int(trainer.optimizer.state[p]["step"]) if p in trainer.optimizer.state else 0
                         for p in ps] for ps in hook.part_params]
        ctx = trainer.train_step()
        trainer.iteration += 1
        assert ctx["part"] == active
        for k, ps in enumerate(hook.part_params):
            moved = [not torch.equal(p, b) for p, b in zip(ps, before[k])]
            steps = [int(trainer.optimizer.state[p]["step"]) if p in trainer.optimizer.state else 0 for p in ps]
            if k == active:
                assert any(moved) and all(s == s0 + 1 for s, s0 in zip(steps, steps_before[k]))
            else:  # (step 0 initialises every actnorm from the first batch, Glow §3.1: weights move once)
                assert steps == steps_before[k] and (it == 0 or not any(moved))
            assert groups[f"part{k}"]["lr"] == pytest.approx(trainer.cfg.train.lr * (1.0 if k == 0 else 0.5))


def test_resume_by_parts_equals_uninterrupted_run_and_keeps_actnorm(tmp_path):
    full = Trainer(tiny_cfg(), tmp_path / "full", progress=False)
    full.fit()
    first = Trainer(tiny_cfg("train.iterations=3", "parts.finetune=0"), tmp_path / "res", progress=False)
    first.fit()
    resumed = Trainer(tiny_cfg(), tmp_path / "res", resume=True, progress=False)
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    rows = (tmp_path / "res" / "log.csv").read_text().splitlines()
    assert rows[0].endswith(",part") and [r.split(",")[-1] for r in rows[1:]] == ["0", "1", "0", "1", "all", "all"]


def test_parts_train_a_stack_of_cnf_blocks(tmp_path):
    cfg = load_recipe("toy-ffjord", [
        "model.num_blocks=2", "model.hidden_dims=[8]", "solver.atol=1e-3", "solver.rtol=1e-3", "train.iterations=2",
        "train.batch_size=16", "data.n_train=64", "data.n_test=64", "parts.enabled=true", "parts.boundaries=[1]",
        "train.checkpoint_every=0", "threads=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    blocks = trainer.model.cnf_blocks()
    trainer.train_step()  # alternate: part 0 first
    assert all(p.grad is not None for p in blocks[0].parameters() if p.requires_grad)
    assert all(p.grad is None for p in blocks[1].parameters())
    trainer.iteration += 1
    trainer.train_step()
    assert all(p.grad is None for p in blocks[0].parameters())
    assert all(p.grad is not None for p in blocks[1].net.parameters())

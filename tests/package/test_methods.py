"""The methods of the one table (fastcnf.methods) compose in one trainer: TO-FLOW + RNODE + learned
tolerances + InfoCNF conditioning on digits, STEER + RNODE + per-block tolerances on a toy set; each
method owns a configuration section and only the hooks a configuration turns on are built."""
from __future__ import annotations

import csv
import json

from fastcnf.methods import load_recipe
from fastcnf.training.trainer import Trainer

SMALL_DIGITS = ["model.hidden_dims=[8]", "train.batch_size=24", "train.checkpoint_every=0", "eval.max_examples=48",
                "eval.atol=1e-3", "eval.rtol=1e-3", "eval.n_samples=4", "train.iterations=3", "threads=1"]


def _log(run_dir) -> list[dict]:
    with open(run_dir / "log.csv") as fh:
        return list(csv.DictReader(fh))


def test_toflow_rnode_learned_tolerances_and_infocnf_train_together(tmp_path):
    cfg = load_recipe("digits-infocnf-learned-tol", SMALL_DIGITS + [
        "endtime.policy=toflow", "model.kinetic_weight=0.01", "model.jacobian_weight=0.01"])
    metrics = Trainer(cfg, tmp_path, progress=False, quiet=True).fit()
    rows = _log(tmp_path)
    blocks = [k[2:] for k in rows[0] if k.startswith("T.")]
    assert blocks and all(f"tol.{b}" in rows[0] for b in blocks)
    # T moved by TO-FLOW's own optimiser and stays inside eq. 17's interval
    assert any(float(rows[-1][f"T.{b}"]) != 1.0 for b in blocks)
    assert all(0.1 <= float(r[f"T.{b}"]) <= 1.9 for r in rows for b in blocks)
    for key in ("test_error", "test_bits_per_dim_conditional", "tolerances", "end_times"):
        assert key in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["end_time_policy"] == "toflow"


def test_steer_rnode_and_per_block_tolerances_train_together(tmp_path):
    cfg = load_recipe("toy-rnode", ["endtime.policy=steer", "tolerances.policy=per_block",
                                    "tolerances.atol=[1e-4]", "tolerances.rtol=[1e-4]", "model.hidden_dims=[8]",
                                    "data.n_test=100", "eval.batch_size=100", "train.batch_size=32",
                                    "train.iterations=3", "train.checkpoint_every=0", "eval.atol=1e-3",
                                    "eval.rtol=1e-3", "threads=1"])
    metrics = Trainer(cfg, tmp_path, progress=False, quiet=True).fit()
    rows = _log(tmp_path)
    sampled = [float(r["T_sampled.cnf0"]) for r in rows]
    assert len(set(sampled)) > 1 and all(0.25 <= t <= 0.75 for t in sampled)  # T ~ U[T0 - b, T0 + b]
    assert metrics["end_times"] == {"cnf0": 0.5}  # evaluation at the fixed T


def test_the_table_lists_each_method_with_its_section_and_objectives():
    import dataclasses

    from fastcnf.methods import METHODS, OBJECTIVES, Config

    names = [m.name for m in METHODS]
    assert len(set(names)) == len(names) == 6
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for m in METHODS:
        assert m.name in fields and isinstance(getattr(Config(), m.name), m.section), m.name
        assert m.docs.startswith("docs/") and m.docs.endswith(".md")
    assert set(OBJECTIVES) == {"likelihood", "flow_matching"}


def test_feature_list_builds_only_the_hooks_a_config_turns_on():
    from fastcnf.conditioning.hook import ConditioningHook
    from fastcnf.endtime.hook import EndTimeHook
    from fastcnf.methods import build_hooks
    from fastcnf.training.trainer import TASKS
    from fastcnf.training.latent_ode_task import LatentODETask
    from fastcnf.parts.hook import PartsHook
    from fastcnf.training.tasks import DensityTask
    from fastcnf.tolerances.hook import LearnedToleranceHook, StaticToleranceHook

    assert TASKS == {"density": DensityTask, "latent_ode": LatentODETask}
    assert build_hooks(load_recipe("toy-ffjord")) == []
    assert build_hooks(load_recipe("toy-ffjord", ["endtime.policy=joint"])) == []  # joint T: no hook
    hooks = build_hooks(load_recipe("digits-infocnf-learned-tol", ["endtime.policy=toflow"]))
    assert [type(h) for h in hooks] == [ConditioningHook, EndTimeHook, LearnedToleranceHook]
    cond = hooks[0]
    assert cond.kind == "infocnf" and cond.beta == load_recipe("digits-infocnf-learned-tol").conditioning.beta
    hooks = build_hooks(load_recipe("toy-ffjord", ["endtime.policy=steer", "tolerances.policy=per_block",
                                                   "tolerances.atol=[1e-3]", "parts.enabled=true",
                                                   "parts.boundaries=[1]"]))
    assert [type(h) for h in hooks] == [EndTimeHook, StaticToleranceHook, PartsHook]

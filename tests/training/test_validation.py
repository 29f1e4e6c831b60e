"""Validation and early stopping (fastcnf.training.validation and the trainer): the logged
validation NLL is the model's NLL on the validation split, training stops at the right validation,
the best weights are restored, tested and exported, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import det_cfg, launch_two_ranks  # noqa: E402
from validation_worker import VALIDATION  # noqa: E402

from fastcnf.config import ConfigError  # noqa: E402
from fastcnf.methods import load_recipe  # noqa: E402
from fastcnf.evaluation.metrics import evaluate_density  # noqa: E402
from fastcnf.training.checkpoint import load_checkpoint  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402
from fastcnf.training.validation import EarlyStopping, final_weights  # noqa: E402

TINY = [
    "model.hidden_dims=[8,8]", "data.n_train=1000", "data.n_test=200", "data.val_fraction=0.2",
    "eval.batch_size=200", "train.batch_size=32", "solver.atol=1e-3", "solver.rtol=1e-3", "eval.atol=1e-4",
    "eval.rtol=1e-4", "eval.figures=false",
]


def cfg(*extra: str, iterations: int = 8):
    return load_recipe("toy-ffjord", TINY + [f"train.iterations={iterations}", *extra])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"parameter {k} differs")


def _val_log(run: Path) -> dict[int, float]:
    return {int(r["iteration"]): float(r["val_nll"]) for r in csv.DictReader(open(run / "log.csv")) if r["val_nll"]}


def _scripted(trainer: Trainer, nll: dict[int, float]) -> Trainer:
    """Replace the validation NLL by a known sequence (iteration -> NLL), so the stopping point is known."""
    trainer.val_task.evaluate = lambda model, device, dtype: {"test_nll_nats": nll[trainer.iteration]}
    return trainer


@torch.no_grad()
def _nll_by_hand(model: torch.nn.Module, x: torch.Tensor) -> float:
    """-mean log p(x) = -(log N(z) + log|det|): the change of variables, outside the evaluation loop."""
    model.eval()
    z, logdet = model(x)
    log_normal = -0.5 * (z.double() ** 2).sum(1) - 0.5 * z.shape[1] * torch.log(torch.tensor(2 * torch.pi)).double()
    return float(-(log_normal + logdet.double()).mean())


def test_logged_validation_nll_is_the_nll_of_the_validation_split(tmp_path: Path) -> None:
    run = Trainer(cfg("train.val_every=3", iterations=7), tmp_path / "run", progress=False)
    run.fit()
    logged = _val_log(tmp_path / "run")
    assert sorted(logged) == [3, 6, 7]  # every val_every iterations and after the last one
    # the weights after 3 iterations, from a run that never validated: validation changes nothing in training
    three = Trainer(cfg(iterations=3), tmp_path / "three", progress=False)
    three.fit()
    assert logged[3] == pytest.approx(_nll_by_hand(three.model, three.bundle.val.x), abs=1e-4)
    assert logged[3] != pytest.approx(_nll_by_hand(three.model, three.bundle.test.x), abs=1e-3)


def test_early_stopping_stops_at_the_validation_where_patience_runs_out(tmp_path: Path) -> None:
    # best at 4; 6 and 8 are worse; patience 2 stops after the validation at 8
    trainer = _scripted(Trainer(cfg("train.val_every=2", "train.patience=2", iterations=20), tmp_path / "run",
                                progress=False), {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.01, 10: 1.0})
    metrics = trainer.fit()
    assert trainer.iteration == 8 and metrics["iterations"] == 8
    assert metrics["best_iteration"] == 4 and metrics["best_val_nll_nats"] == 2.0 and metrics["stopped_early"]
    assert _val_log(tmp_path / "run") == {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.01}
    # the best weights are those after 4 iterations: a run of 4 iterations without validation
    four = Trainer(cfg(iterations=4), tmp_path / "four", progress=False)
    four.fit()
    _assert_same(_weights(trainer.model), _weights(four.model))
    # ... and they are exported, reported, and kept in the checkpoint beside the last weights
    _assert_same(load_file(tmp_path / "run" / "model.safetensors"), _weights(four.model))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    _assert_same(final_weights(state), _weights(four.model))
    assert state["iteration"] == 8
    assert any(not torch.equal(state["model"][k], v) for k, v in _weights(four.model).items())  # last != best


def test_test_metrics_are_those_of_the_best_weights(tmp_path: Path) -> None:
    trainer = _scripted(Trainer(cfg("train.val_every=2", iterations=6), tmp_path / "run", progress=False),
                        {2: 1.0, 4: 2.0, 6: 3.0})
    metrics = trainer.fit()
    assert metrics["best_iteration"] == 2 and not metrics["stopped_early"] and metrics["iterations"] == 6
    two = Trainer(cfg(iterations=2), tmp_path / "two", progress=False)  # an independent run to the best iteration
    two.fit()
    assert metrics["test_nll_nats"] == pytest.approx(_nll_by_hand(two.model, two.bundle.test.x), abs=1e-4)
    reference = evaluate_density(two.model, two.bundle, two.cfg.eval)["test_nll_nats"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_nll_nats"] == pytest.approx(reference,
                                                                                                          abs=1e-6)


def test_resume_with_best_weights_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # the best validation (4) is the last one before the interruption: the resumed run must take it
    # from the checkpoint; patience 2 stops both runs after the validation at 8
    nll = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.2, 10: 1.0}
    extra = ("train.val_every=2", "train.patience=2", "train.checkpoint_every=3")
    full = _scripted(Trainer(cfg(*extra, iterations=12), tmp_path / "full", progress=False), nll)
    full_metrics = full.fit()
    part = _scripted(Trainer(cfg(*extra, iterations=4), tmp_path / "part", progress=False), nll)
    part.fit()
    resumed = _scripted(Trainer(cfg(*extra, iterations=12), tmp_path / "part", resume=True, progress=False), nll)
    assert resumed.iteration == 4 and resumed.early.best_iteration == 4
    metrics = resumed.fit()
    for key in ("iterations", "best_iteration", "best_val_nll_nats", "stopped_early", "test_nll_nats"):
        assert metrics[key] == pytest.approx(full_metrics[key], abs=1e-6), key
    assert metrics["iterations"] == 8 and metrics["best_iteration"] == 4
    _assert_same(_weights(resumed.model), _weights(full.model))
    last = [load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "part")]
    _assert_same(last[0]["model"], last[1]["model"])
    assert _val_log(tmp_path / "part") == _val_log(tmp_path / "full")


def test_real_validation_with_patience_one_stops_at_the_first_validation_without_improvement(tmp_path: Path) -> None:
    # a large learning rate makes the validation NLL go up and down; the log tells where it must stop
    trainer = Trainer(cfg("train.val_every=1", "train.patience=1", "train.lr=0.05", iterations=40), tmp_path,
                      progress=False)
    metrics = trainer.fit()
    logged = _val_log(tmp_path)
    its = sorted(logged)
    best = [min(logged[j] for j in its[:k + 1]) for k in range(len(its))]
    first_worse = next((it for k, it in enumerate(its) if k > 0 and logged[it] >= best[k - 1]), None)
    assert first_worse is not None, "the learning rate did not make the validation NLL rise"
    assert its[-1] == first_worse == metrics["iterations"] and metrics["stopped_early"]
    assert metrics["best_iteration"] == its[-2] and metrics["best_val_nll_nats"] == pytest.approx(logged[its[-2]])


def test_early_stopping_state_machine() -> None:
    net = torch.nn.Linear(2, 1)
    stop = EarlyStopping(val_every=5, patience=0)
    assert [stop.due(i, 12) for i in (4, 5, 10, 11, 12)] == [False, True, True, False, True]
    for it, nll in ((5, 2.0), (10, float("nan")), (15, None), (20, 2.0), (25, 9.0)):
        stop.update(nll, it, net)
    assert not stop.stopped and stop.best_iteration == 5 and stop.since_best == 4  # patience 0: never stops
    restored = EarlyStopping(5, 0)
    restored.load_state_dict(stop.state_dict())
    assert restored.summary() == stop.summary() == {"best_val_nll_nats": 2.0, "best_iteration": 5,
                                                    "stopped_early": False}
    assert EarlyStopping(0, 0).summary()["best_val_nll_nats"] is None and not EarlyStopping(0, 0).due(5, 5)


def test_validation_without_a_validation_split_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a validation split: set data.val_fraction"):
        Trainer(cfg("train.val_every=2", "data.val_fraction=0"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="train.patience=3 counts validations"):
        cfg("train.patience=3")
    assert not (tmp_path / "log.csv").exists()


def test_runs_without_validation_have_no_validation_column_or_keys(tmp_path: Path) -> None:
    metrics = Trainer(cfg(iterations=2), tmp_path, progress=False).fit()
    assert "val_nll" not in next(csv.reader(open(tmp_path / "log.csv")))
    assert not {"best_val_nll_nats", "best_iteration", "stopped_early"} & set(metrics)


def test_eval_command_evaluates_the_best_weights_and_a_missing_split_exits_2(tmp_path: Path, capsys) -> None:
    from fastcnf.cli import main

    trainer = _scripted(Trainer(cfg("train.val_every=2", iterations=6), tmp_path / "run", progress=False),
                        {2: 1.0, 4: 2.0, 6: 3.0})
    trained = trainer.fit()["test_nll_nats"]
    last_weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    trainer.model.load_state_dict(last_weights)
    at_last = evaluate_density(trainer.model, trainer.bundle, trainer.cfg.eval)["test_nll_nats"]
    assert abs(at_last - trained) > 1e-4  # the test can tell the best weights from the last ones
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_nll_nats"] == pytest.approx(trained,
                                                                                                          abs=1e-6)
    capsys.readouterr()
    code = main(["train", "toy-ffjord", "--out", str(tmp_path / "bad"), "--quiet", "--set", "train.val_every=2",
                 "train.iterations=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.val_fraction" in err[0]
    assert not (tmp_path / "bad" / "log.csv").exists()


def test_two_ranks_validate_alike_and_stop_together_as_one_process(tmp_path: Path) -> None:
    """Every rank computes the validation NLL of the same weights, so both stop at the iteration one
    process on the global batch stops at, with its best weights (deterministic float64 rk4 set-up)."""
    launch_two_ranks(Path(__file__).parent / "workers" / "validation_worker.py", [str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = Trainer(det_cfg(*VALIDATION), tmp_path / "single", progress=False)
    single.fit()
    assert single.early.stopped and single.iteration < 12  # lr 0.1 makes it stop early (at 10 when written)
    for r in ranks:
        assert r["iteration"] == single.iteration and r["summary"]["best_iteration"] == single.early.best_iteration
        assert r["summary"]["best_val_nll_nats"] == pytest.approx(single.early.best_nll, abs=1e-9)
        _assert_same(r["params"], _weights(single.model), atol=1e-10)

"""Runs survive what clusters and people do to them: SIGTERM / SIGUSR1 save and resume exactly (one
process and 2-process gloo), one writer per run directory, checkpoints by time, divergence stops with
the last good checkpoint kept, and runaway evaluation solves stop at their cap. Real subprocesses and
real signals throughout (the CLI as users run it)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import DETERMINISTIC, det_cfg, free_port  # noqa: E402

from fastcnf.ode.budget import SolveBudget  # noqa: E402
from fastcnf.ode.solve import SolverBudgetExceeded  # noqa: E402
from fastcnf.training.checkpoint import load_checkpoint  # noqa: E402
from fastcnf.training.runlock import LOCK_NAME, RunLock, RunLocked  # noqa: E402
from fastcnf.training.trainer import Trainer, TrainingDiverged  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
ITERS = 80
#: the tiny deterministic run of the distributed tests, through the CLI (float64, rk4, exact trace)
RUN = DETERMINISTIC + ["eval.figures=false", "train.log_every=1", "train.checkpoint_minutes=0"]
EXIT = {signal.SIGTERM: 143, signal.SIGUSR1: 138}


def _env(rank: int | None = None, port: int = 0) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a rank that aborts shows where (its Python stack) in the failure message
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _start(args: list[str], rank: int | None = None, port: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastcnf", *args], env=_env(rank, port), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "toy-ffjord", "--quiet", "--out", str(out), "--set", *RUN, f"train.iterations={ITERS}", *extra]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a training process did not end")
    return logs


def _wait_for_iteration(proc: subprocess.Popen, target: int) -> str:
    """Read ``proc``'s progress lines up to iteration ``target`` (the run keeps going)."""
    seen = ""
    for line in proc.stdout:
        seen += line
        m = re.match(r"iter (\d+)/", line)
        if m and int(m.group(1)) >= target:
            return seen
    pytest.fail(f"the run ended before iteration {target}:\n{seen[-2000:]}")


def _nll(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["test_nll_nats"]


@pytest.fixture(scope="module")
def reference_nll(tmp_path_factory) -> dict[int, float]:
    """Uninterrupted runs: one process in this process (the same float64 computation as the CLI's),
    two ranks as two CLI processes."""
    from fastcnf.methods import load_recipe

    one = Trainer(load_recipe("toy-ffjord", RUN + [f"train.iterations={ITERS}"]),
                  tmp_path_factory.mktemp("uninterrupted1"), progress=False).fit()
    out = tmp_path_factory.mktemp("uninterrupted2")
    port = free_port()
    procs = [_start(_train(out), rank, port) for rank in range(2)]
    logs = _finish(procs)
    failed = [(r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-2000:]}" for r, rc, log in failed)
    return {1: one["test_nll_nats"], 2: _nll(out)}


@pytest.mark.parametrize("ranks,sig,receivers", [
    (1, signal.SIGTERM, [0]), (1, signal.SIGUSR1, [0]),
    (2, signal.SIGTERM, [0, 1]),  # torchrun forwards SIGTERM to every rank
    (2, signal.SIGUSR1, [1]),  # a signal to one rank only: every rank still stops at the same iteration
], ids=["1proc-SIGTERM", "1proc-SIGUSR1", "2proc-SIGTERM-all", "2proc-SIGUSR1-rank1"])
def test_signal_saves_and_resume_equals_uninterrupted(tmp_path: Path, reference_nll, ranks: int, sig, receivers) -> None:
    target = random.Random(f"{ranks}{sig}").randint(3, 15)
    out = tmp_path / "run"
    port = free_port()
    procs = [_start(_train(out), rank if ranks > 1 else None, port) for rank in range(ranks)]
    head = _wait_for_iteration(procs[0], target)
    for r in receivers:
        procs[r].send_signal(sig)
    logs = _finish(procs)
    logs[0] = head + logs[0]
    for p, log in zip(procs, logs):
        assert p.returncode == EXIT[sig], log[-2000:]
    stopped = int(load_checkpoint(out / "checkpoints" / "last.pt")["iteration"])
    assert target <= stopped < ITERS
    assert f"stopped by {sig.name} at iteration {stopped}" in logs[0]
    assert f"continue with: fastcnf train --resume {out}" in logs[0]
    assert not (out / "metrics.json").exists() and not (out / LOCK_NAME).exists()
    port = free_port()
    procs = [_start(["train", "--resume", str(out), "--quiet"], rank if ranks > 1 else None, port)
             for rank in range(ranks)]
    logs = _finish(procs)
    failed = [(r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-2000:]}" for r, rc, log in failed)
    assert _nll(out) == reference_nll[ranks]  # float64, deterministic: exactly the uninterrupted run's
    rows = (out / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, ITERS + 1))


def test_time_checkpoints_one_writer_and_stale_lock_after_kill_9(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _start(_train(out, "train.iterations=100000", "train.checkpoint_every=0", "train.checkpoint_minutes=0.001"))
    _wait_for_iteration(first, 5)
    deadline = time.monotonic() + 30  # the run goes on: a checkpoint by time comes within 0.06 s of running
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "checkpoints" / "last.pt").exists()  # written by time only (checkpoint_every=0)
    lock = (out / LOCK_NAME).read_text()
    assert f"pid={first.pid}" in lock and f"host={socket.gethostname()}" in lock
    # a second `train` and a `train --resume` on the directory are refused while the first runs
    seconds = [subprocess.Popen([sys.executable, "-m", "fastcnf", *args], env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for args in (_train(out), ["train", "--resume", str(out)])]
    for second in seconds:
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 2, err[-2000:]
        assert f"is being written by process {first.pid} on host {socket.gethostname()}" in err
        assert len(err.strip().splitlines()) == 1
    first.kill()  # SIGKILL: no handler runs; what exists was written by time
    _finish([first])
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 1 <= state["iteration"] < 100000
    # the writer is gone: the next one takes its lock over with a line saying so, and finishes
    after = subprocess.run([sys.executable, "-m", "fastcnf", "train", "--resume", str(out), "--quiet", "--set",
                            f"train.iterations={state['iteration'] + 2}"], env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert after.returncode == 0, after.stderr[-2000:]
    assert f"taking over the stale lock of {out} left by process {first.pid}" in after.stderr
    assert json.loads((out / "metrics.json").read_text())["iterations"] == state["iteration"] + 2
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_gone_process_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(f"pid={gone.pid}\nhost={socket.gethostname()}\n")
    lines: list[str] = []

    class Sink:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    with RunLock(tmp_path, stream=Sink()) as lock:
        assert f"pid={os.getpid()}" in lock.path.read_text()
        assert "taking over the stale lock" in "".join(lines) and f"process {gone.pid}" in "".join(lines)
        with pytest.raises(RunLocked, match=f"process {os.getpid()}"):  # held: a second lock is refused
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_diverging_run_stops_with_the_line_and_its_last_checkpoint_loads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the rate becomes infinite after 5 steps: step 6 makes the parameters non-finite
    r = subprocess.run([sys.executable, "-m", "fastcnf", *_train(out, "train.iterations=20", "train.checkpoint_every=2",
                        "train.schedule=step", "train.decay_at=[5]", "train.decay_factor=.inf")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("fastcnf: error: training diverged at iteration 6: the parameters became non-finite")
    assert f"{out / 'checkpoints' / 'last.pt'} (iteration 4) is kept" in line and "train.lr" in line
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    t = Trainer.from_run_dir(out, resume=True, progress=False)  # loads and trains on
    assert t.iteration == 4 and torch.isfinite(t.train_step()["loss"])


def _nan_at(trainer: Trainer, bad: set[int]) -> None:
    """Fault injection: the task's loss is NaN at the given (0-based) iterations."""
    step = trainer.task.step

    def faulty(model, ctx):
        step(model, ctx)
        if ctx["iteration"] in bad:
            ctx["loss"] = ctx["loss"] * float("nan")

    trainer.task.step = faulty


def test_loss_spikes_are_skipped_up_to_the_bound(tmp_path: Path) -> None:
    cfg = det_cfg("train.iterations=6", "train.max_loss_spikes=2", "eval.figures=false")
    t = Trainer(cfg, tmp_path, progress=False)
    _nan_at(t, {1, 3})
    t.train_step()
    t.iteration += 1
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    adam_steps = [int(s["step"]) for s in t.optimizer.state.values()]
    ctx = t.train_step()  # iteration 1: skipped
    assert ctx["skipped"] and t.skipped_steps == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [int(s["step"]) for s in t.optimizer.state.values()] == adam_steps  # no optimiser update
    assert all(p.grad is None for p in t.model.parameters())
    t.iteration += 1
    metrics = t.fit()
    assert metrics["skipped_steps"] == 2 and metrics["iterations"] == 6
    assert (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")[-1] == "2"
    # a third bad step exceeds the bound
    t = Trainer(cfg, tmp_path / "again", progress=False)
    _nan_at(t, {0, 1, 2})
    with pytest.raises(TrainingDiverged, match=r"iteration 3: the loss became nan after 2 skipped step"):
        t.fit()


def _stiff(trainer: Trainer, scale: float) -> None:
    """A diverged field: every weight scaled up, so the adaptive solver's steps shrink (at 300 the
    evaluation solves of this model take ~380 evaluations, at 3000 ~1200)."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(scale)


def test_evaluation_of_a_diverging_field_stops_at_its_nfe_cap_on_the_first_batch(tmp_path: Path) -> None:
    t = Trainer(det_cfg("solver.method=dopri5", "solver.max_nfe=100", "eval.batch_size=16"), tmp_path, progress=False)
    _stiff(t, 300.0)
    block = t.model.cnf_blocks()[0]
    with pytest.raises(SolverBudgetExceeded, match=f"{block.name}: forward solve exceeded max_nfe=100"):
        t.evaluate()
    assert block.nfe.forward == 100 and block.nfe._n == 0  # the first batch's solve, no later batch


def test_evaluation_stops_at_its_wall_time_cap_naming_block_and_nfe(tmp_path: Path) -> None:
    t = Trainer(det_cfg("solver.method=dopri5", "solver.max_nfe=0", "eval.max_seconds=0.1"), tmp_path, progress=False)
    _stiff(t, 1e5)
    with pytest.raises(SolverBudgetExceeded) as e:
        t.evaluate()
    msg = str(e.value)
    block = t.model.cnf_blocks()[0]
    assert msg.startswith(f"{block.name}: evaluation stopped after") and "(eval.max_seconds=0.1)" in msg
    nfe = int(re.search(r"in a forward solve at NFE (\d+) \(test batch 1/1\)", msg).group(1))
    assert nfe >= block.nfe.forward > 0 and block.nfe._n == 0  # stopped inside the first solve
    # the cap is on the whole group of solves: a second solve in an exhausted group stops at once
    with SolveBudget(1e-9, "a test"), pytest.raises(SolverBudgetExceeded, match="a test stopped after"):
        time.sleep(1e-3)
        Trainer(det_cfg("solver.method=dopri5"), tmp_path, progress=False).model(torch.zeros(2, 2, dtype=torch.float64))


def test_capped_final_evaluation_keeps_weights_and_says_so_in_metrics(tmp_path: Path) -> None:
    """The diverged flow-matching run of the issue, shortened: trained weights saved, one line, exit 2."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastcnf", "train", "toy-fm", "--quiet", "--out", str(out), "--set",
                        "train.lr=1e6", "train.iterations=30", "eval.max_seconds=2", "threads=1"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("fastcnf: error: cnf0: evaluation stopped after") and "eval.max_seconds=2" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_error"] == line.removeprefix("fastcnf: error: ") and metrics["iterations"] == 30
    assert (out / "model.safetensors").exists() and load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 30


def test_capped_intermediate_evaluation_saves_and_stops(tmp_path: Path) -> None:
    """An evaluation during training (train.eval_every) that hits its cap stops the run after saving."""
    t = Trainer(det_cfg("train.iterations=6", "train.eval_every=2", "eval.max_seconds=1e-9"), tmp_path,
                progress=False)
    with pytest.raises(SolverBudgetExceeded, match=r"evaluation stopped after .* \(eval\.max_seconds=1e-09\)"):
        t.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("command,what", [(["eval"], "evaluation"), (["sample", "--n", "8", "--out", "s.npy"], "sampling")])
def test_eval_and_sample_stop_at_the_wall_time_cap(tmp_path: Path, command: list[str], what: str) -> None:
    out = tmp_path / "run"
    Trainer(det_cfg("train.iterations=2", "eval.figures=false"), out, progress=False).fit()
    r = subprocess.run([sys.executable, "-m", "fastcnf", command[0], str(out), *command[1:], "--set",
                        "eval.max_seconds=1e-9"], env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.fullmatch(rf"fastcnf: error: cnf0: {what} stopped after 0 s \(eval.max_seconds=1e-09\) in a forward "
                        r"solve at NFE 1.*raise eval.max_seconds", r.stderr.strip())
    assert not (tmp_path / "s.npy").exists()

"""Flow matching as a training objective: a trained model's density and sampler agree, conditional
sampling gives the requested class, the NLL reaches the analytic value on Gaussian data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastcnf.config import ConfigError
from fastcnf.methods import load_recipe
from fastcnf.data.toy import MIX1D_MEANS
from fastcnf.training.trainer import Trainer

FAST = ["threads=1", "train.checkpoint_every=0", "eval.figures=false", "data.n_train=2000", "data.n_test=500",
        "train.batch_size=256", "train.lr=1e-3", "train.schedule=constant"]  # the settings these tests were sized for


def _fit(recipe: str, tmp_path, *overrides: str) -> Trainer:
    trainer = Trainer(load_recipe(recipe, FAST + list(overrides)), tmp_path / recipe, progress=False)
    trainer.fit()
    return trainer


def test_class_conditional_flow_matching_samples_the_requested_class(tmp_path):
    trainer = _fit("toy-fm", tmp_path, "data.name=mix1d", "conditioning.kind=ccnf",
                   "train.iterations=300", "flow_matching.coupling=exact", "model.hidden_dims=[32,32]")
    model = trainer.model.eval()
    torch.manual_seed(0)
    for label in range(3):
        x = model.sample(200, torch.full((200,), label)).squeeze(1).numpy()
        nearest = np.abs(x[:, None] - MIX1D_MEANS[None]).argmin(1)
        assert (nearest == label).mean() >= 0.9, (label, (nearest == label).mean())
    metrics = trainer.evaluate()
    assert metrics["test_error"] <= 0.05  # Bayes' rule over the class-conditional likelihoods
    assert metrics["sample_accuracy"] >= 0.9


def test_flow_matching_model_density_sampler_and_inverse_agree(tmp_path):
    """encode / decode invert each other and log_prob = log p(encode(x)) + logdet, at the solver's
    accuracy (evaluation tolerance 1e-9)."""
    trainer = _fit("toy-fm", tmp_path, "train.iterations=100", "model.hidden_dims=[32,32]",
                   "eval.atol=1e-9", "eval.rtol=1e-9")
    model = trainer.model.eval().double()
    x = trainer.bundle.test.x[:16].double()
    z = model.encode(x)
    torch.testing.assert_close(model.decode(z), x, atol=1e-6, rtol=0)
    _, logdet = model(x)
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(z) + logdet)
    torch.manual_seed(1)
    s = model.sample(8)
    torch.testing.assert_close(model.decode(model.encode(s)), s, atol=1e-6, rtol=0)


def test_flow_matching_reaches_the_entropy_of_the_data(tmp_path):
    """mix1d (three Gaussians, std 0.5, means -4, 0, 4, equal weights; overlap negligible) has
    entropy log 3 + log(0.5 sqrt(2 pi e)) = 1.8244 nats: the test NLL of the trained CNF, by the
    exact likelihood, approaches it from above."""
    entropy = math.log(3) + math.log(0.5 * math.sqrt(2 * math.pi * math.e))
    trainer = _fit("toy-fm", tmp_path, "data.name=mix1d", "train.iterations=1500", "train.lr=3e-3",
                   "model.hidden_dims=[32,32]", "flow_matching.coupling=exact")
    nll = trainer.evaluate()["test_nll_nats"]
    assert entropy - 0.1 < nll < entropy + 0.15, (nll, entropy)


@pytest.mark.parametrize("override", ["model.end_time=0.5", "model.num_blocks=2", "model.arch=multiscale",
                                      "solver.atol=1e-3", "conditioning.beta=0.5"])
def test_flow_matching_rejects_settings_it_cannot_train(override):
    with pytest.raises(ConfigError, match="flow_matching"):
        load_recipe("toy-fm", [override])


@pytest.mark.parametrize("override", ["endtime.policy=toflow", "endtime.policy=joint", "conditioning.kind=infocnf"])
def test_flow_matching_rejects_a_model_it_cannot_train(override):
    """The method's check on the built model: a learned or random end time, or InfoCNF's partial
    conditioning, cannot be trained by flow matching (the path runs over [0, 1] on all of z)."""
    from fastcnf.data import load_data
    from fastcnf.methods import build_model

    cfg = load_recipe("toy-fm", ["data.n_train=64", "data.n_test=64", override])
    if override.startswith("conditioning"):  # labelled images: z_y is half of the latent
        cfg = load_recipe("digits-fm", [override])
    with pytest.raises(ConfigError, match="flow_matching"):
        build_model(cfg, load_data(cfg.data))


def test_ot_batch_size_pairs_within_consecutive_groups(tmp_path):
    """flow_matching.ot_batch_size=4 on a batch of 10: the coupling sees groups 0,0,0,0,1,1,1,1,2,2
    (and with classes, the class-group pairs), so every partner comes from its own group."""
    from fastcnf.flow_matching.pairing import ExactOTCoupling

    trainer = Trainer(load_recipe("toy-otcfm", FAST + ["train.batch_size=10", "flow_matching.ot_batch_size=4",
                                                       "train.iterations=1", "model.hidden_dims=[8]",
                                                       "flow_matching.background_pairing=false"]),
                      tmp_path / "ot", progress=False)
    objective = trainer.task.objective
    seen = {}

    def recording(x, noise, labels=None, generator=None):
        seen["labels"] = labels
        seen["index"] = ExactOTCoupling()(x, noise, labels=labels)
        return seen["index"]

    objective.coupling = recording
    trainer.train_step()
    groups = torch.arange(10) // 4
    assert torch.equal(seen["labels"], groups)
    assert torch.equal(groups[seen["index"]], groups)


def _otcfm(n: int, background: bool, *extra: str):
    return load_recipe("toy-otcfm", [
        "threads=1", f"train.iterations={n}", "train.batch_size=64", "flow_matching.ot_batch_size=32",
        "data.n_test=64", "eval.batch_size=64", "eval.atol=1e-2", "eval.rtol=1e-2", "eval.figures=false",
        "train.checkpoint_every=3", "train.warmup_iterations=0", "train.schedule=constant",
        f"flow_matching.background_pairing={str(background).lower()}", *extra])


@pytest.mark.parametrize("labels,workers", [(False, 1), (True, 1), (False, 3)])
def test_background_pairing_gives_the_pairs_of_pairing_in_line_and_resumes_bit_identically(tmp_path, labels, workers):
    extra = ["data.name=mix1d", "conditioning.kind=ccnf", "model.hidden_dims=[16,16]"] if labels else []
    extra.append(f"flow_matching.pairing_workers={workers}")
    seen: dict[bool, list] = {True: [], False: []}

    def run(background: bool, n: int, out, resume: bool = False) -> Trainer:
        trainer = Trainer(_otcfm(n, background, *extra), out, resume=resume, progress=False)
        objective = trainer.task.objective
        pair = objective.coupling.__class__.__call__

        def record(self, x, noise, labels=None, generator=None):  # every pairing, in line or in the worker
            index = pair(self, x, noise, labels, generator)
            seen[background].append((x.clone(), noise.clone(), index.clone()))
            return index

        objective.coupling.__class__.__call__ = record
        try:
            trainer.fit()
        finally:
            objective.coupling.__class__.__call__ = pair
        return trainer

    on, off = run(True, 6, tmp_path / "on"), run(False, 6, tmp_path / "off")
    assert on.task.objective.background.prefetched == 5  # every step after the first was paired ahead
    assert off.task.objective.background is None
    # the worker paired exactly the batches (data and noise) that pairing in line pairs, with the same result
    assert len(seen[False]) >= 6
    for x2, n2, i2 in seen[False]:  # each batch paired in line was paired alike (in the worker) with it on
        match = [i1 for x1, n1, i1 in seen[True] if torch.equal(x1, x2) and torch.equal(n1, n2)]
        assert match and all(torch.equal(i1, i2) for i1 in match)
        assert sorted(i2.tolist()) == list(range(len(i2)))  # a permutation
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        assert torch.equal(a, b)
    # an interrupted run (3 iterations, then a new trainer resumes to 6) equals the uninterrupted one
    run(True, 3, tmp_path / "part")
    resumed = run(True, 6, tmp_path / "part", resume=True)
    for a, b in zip(on.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["8gaussians", "mix1d"])
def test_peek_batch_ahead_gives_the_batches_the_coming_steps_draw(tmp_path, name):
    """``Trainer.peek_batch(k)`` returns the batch of the k-th coming step and consumes nothing."""
    trainer = Trainer(_otcfm(8, False, f"data.name={name}", "data.n_train=100"), tmp_path, progress=False)
    ahead = [trainer.peek_batch(k) for k in (1, 2, 3, 4)]
    assert torch.equal(trainer.peek_batch(2)[0], ahead[1][0])  # peeking twice gives the same
    drawn = [trainer.task.prepare(*trainer.batcher.next()) for _ in range(4)]
    for (xa, ya), (xd, yd) in zip(ahead, drawn):
        assert torch.equal(xa, xd) and (ya is None) == (yd is None) and (ya is None or torch.equal(ya, yd))
    assert not torch.equal(ahead[0][0], ahead[1][0])
    with pytest.raises(ValueError, match="ahead >= 1"):
        trainer.peek_batch(0)


@pytest.mark.parametrize("background,workers", [(True, 2), (True, 1), (False, 2)])
def test_start_line_says_when_pairs_are_computed_ahead_in_worker_threads(tmp_path, background, workers):
    from fastcnf.training.startup import start_line

    trainer = Trainer(_otcfm(2, background, f"flow_matching.pairing_workers={workers}"), tmp_path, progress=False)
    line = start_line(trainer, {})
    if background:
        word = "thread" if workers == 1 else "threads"
        assert line.endswith(f"| exact OT pairs computed {workers} batch{'es' if workers > 1 else ''} ahead in "
                             f"{workers} worker {word}"), line
    else:
        assert "worker" not in line and line.endswith(f"threads {torch.get_num_threads()}"), line

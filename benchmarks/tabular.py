"""Test NLL, CPU and wall time of ``tabular`` (= ``tabular-fm``) and ``tabular-cnf`` against scikit-learn's density
estimators on scikit-learn's bundled tables.

Tables: breast cancer (569 x 30), wine (178 x 13) and digits (1797 x 64 pixel counts 0..16, used
as a table: dequantised with uniform noise in [0, 1) drawn from seed 0, and the columns that are
constant in the training rows dropped, since a constant column has no density). Per seed, a
permutation drawn from the seed holds out 20% of the rows as test and 10% of the rest as
validation; the same three files go to every method.

Everyone works on the same standardisation (the training rows' mean and population std): the
fastcnf recipes standardise internally and report log-densities in the data's units (with the
log-Jacobian ``-sum log std``); the baselines are fitted on the standardised training rows and
get the same log-Jacobian added, so every figure is a test NLL in nats in the data's units.

* ``GaussianMixture``: components in {1, 2, 4, 8, 16} x covariance type in {full, tied, diag,
  spherical} (each fit with ``reg_covar=1e-6``, seed-fixed init), the pair with the best mean
  validation log-likelihood.
* ``KernelDensity``: Gaussian kernel, bandwidth on a grid of 25 values in [0.05, 3] (standardised
  units, log-spaced), the best on validation.
* ``tabular`` / ``tabular-fm`` / ``tabular-cnf``: the recipes as shipped (their own iterations,
  validation, early stopping and best weights; ``tabular-fm`` whitens the table and widens its
  network to 4 x columns), ``threads=1``; ``--iters-fm`` / ``--iters-cnf`` cap
  ``train.iterations`` if given. Budget: a fit must stay within 5 minutes of CPU time on one
  core; ``cpu_s`` is the child process's user + system time (``getrusage``) and ``wall_s`` the
  whole ``fastcnf train`` process (training, validations and the exact-trace test NLL at dopri5
  1e-5). ``--set KEY=VALUE`` passes overrides to every fastcnf fit.

Synthetic tables of the MAF sets' sizes (``synth-power``, ``synth-gas``, ``synth-hepmass``,
``synth-miniboone``, ``synth-bsds300``: the rows and columns of Papamakarios et al. 2017's
train / validation / test splits, drawn from a fixed nonlinear mixture, :func:`synthetic_table`):
the same methods on a table that is large in rows. The training split is written whole (fastcnf
memory-maps it); every method is selected on the first ``--synth-val-rows`` validation rows and
scored on the first ``--synth-test-rows`` test rows (the same rows for all; the exact-trace
likelihood of a 63-column table costs ~64 network evaluations per solver stage). The scikit-learn
baselines are fitted on a seeded subsample (``--gmm-rows`` for GaussianMixture, ``--kde-rows``
for KernelDensity, whose scoring cost grows with the rows it keeps), as a user would on millions of
rows.

Commands (committed results)::

    python benchmarks/tabular.py --seeds 0 1 2 --methods gmm kde tabular --out benchmarks/results/tabular.json
    python benchmarks/tabular.py --tables synth-power synth-gas synth-hepmass synth-miniboone synth-bsds300 \
        --seeds 0 --methods gmm kde tabular --out benchmarks/results/tabular_synthetic.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, load_average, mean_std, run_metadata, write_json

TABLES = ("breast_cancer", "wine", "digits")
GMM_COMPONENTS = (1, 2, 4, 8, 16)
GMM_COVARIANCES = ("full", "tied", "diag", "spherical")
KDE_BANDWIDTHS = np.geomspace(0.05, 3.0, 25)
#: columns and train / validation / test rows of the MAF sets (Papamakarios et al. 2017, Table 5 / the data release)
SYNTH = {"synth-power": (6, 1_659_917, 184_435, 204_928), "synth-gas": (8, 852_174, 94_685, 105_206),
         "synth-hepmass": (21, 315_123, 35_013, 174_987), "synth-miniboone": (43, 29_556, 3_284, 3_648),
         "synth-bsds300": (63, 1_000_000, 50_000, 250_000)}


def synthetic_table(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) of a MAF set's size: a 4-component Gaussian mixture in ``d`` columns (means
    N(0, 2^2), per-column scales U(0.3, 1)), each column bent by ``0.5 sin(1.5 z_j)`` of another
    column, then rotated by a random orthogonal matrix; fixed by the table (not the seed), float64."""
    d, *sizes = SYNTH[name]
    n = sum(sizes)
    rng = np.random.default_rng([20170519, d])
    k = 4
    means, scales = rng.normal(scale=2.0, size=(k, d)), rng.uniform(0.3, 1.0, size=(k, d))
    comp = rng.integers(k, size=n)
    z = means[comp] + scales[comp] * rng.standard_normal((n, d))
    z += 0.5 * np.sin(1.5 * z[:, rng.permutation(d)])
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = z @ q
    return x[:sizes[0]], x[sizes[0]:sizes[0] + sizes[1]], x[sizes[0] + sizes[1]:]


def load_table(name: str) -> np.ndarray:
    """The table as float64 rows (digits dequantised with U[0, 1) noise from seed 0)."""
    from sklearn import datasets

    if name == "breast_cancer":
        return datasets.load_breast_cancer().data.astype(np.float64)
    if name == "wine":
        return datasets.load_wine().data.astype(np.float64)
    if name == "digits":
        x = datasets.load_digits().data.astype(np.float64)
        return x + np.random.default_rng(0).uniform(size=x.shape)
    raise ValueError(f"unknown table {name!r}; one of {TABLES}")


def split(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test): 20% test, 10% of the rest validation, by a permutation from ``seed``;
    columns constant in the training rows are dropped from all three."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(0.2 * len(x)))
    test, rest = x[perm[:n_test]], x[perm[n_test:]]
    n_val = int(round(0.1 * len(rest)))
    val, train = rest[:n_val], rest[n_val:]
    keep = train.std(axis=0) > 0
    return train[:, keep], val[:, keep], test[:, keep]


def standardise(train: np.ndarray, *others: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """The log-Jacobian ``-sum log std`` and ``(a - mean) / std`` of train and the others."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    return -float(np.log(std).sum()), [(a - mean) / std for a in (train, *others)]


def _subsample(a: np.ndarray, rows: int | None, seed: int) -> np.ndarray:
    if not rows or len(a) <= rows:
        return a
    return a[np.sort(np.random.default_rng(seed).choice(len(a), rows, replace=False))]


def gaussian_mixture(train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int,
                     fit_rows: int | None = None) -> dict:
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    logdet, (tr, va, te) = standardise(train, val, test)
    tr = _subsample(tr, fit_rows, seed)
    best = None
    for k in GMM_COMPONENTS:
        if k > len(tr):
            continue
        for cov in GMM_COVARIANCES:
            try:
                gm = GaussianMixture(k, covariance_type=cov, reg_covar=1e-6, random_state=seed, max_iter=500).fit(tr)
            except ValueError:  # ill-defined covariance (too few rows for a full one)
                continue
            score = gm.score(va)
            if best is None or score > best[0]:
                best = (score, k, cov, gm)
    score, k, cov, gm = best
    nll = -float(gm.score_samples(te).mean()) - logdet
    return {"test_nll_nats": nll, "val_nll_nats": -score - logdet, "components": k, "covariance_type": cov,
            "fit_rows": len(tr), "wall_s": time.perf_counter() - start}


def kernel_density(train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int = 0,
                   fit_rows: int | None = None) -> dict:
    from sklearn.neighbors import KernelDensity

    start = time.perf_counter()
    logdet, (tr, va, te) = standardise(train, val, test)
    tr = _subsample(tr, fit_rows, seed)
    scores = [(KernelDensity(bandwidth=float(h)).fit(tr).score_samples(va).mean(), float(h)) for h in KDE_BANDWIDTHS]
    score, h = max(scores)
    nll = -float(KernelDensity(bandwidth=h).fit(tr).score_samples(te).mean()) - logdet
    return {"test_nll_nats": nll, "val_nll_nats": -float(score) - logdet, "bandwidth": h, "fit_rows": len(tr),
            "wall_s": time.perf_counter() - start}


def fastcnf_fit(recipe: str, files: dict[str, Path], seed: int, iterations: int | None, out: Path,
                extra: list[str] = ()) -> dict:
    """``fastcnf train RECIPE`` in a child process (one thread); its metrics, wall and CPU time."""
    cmd = [sys.executable, "-m", "fastcnf", "train", recipe, "--quiet", "--out", str(out), "--set",
           f"data.path={files['train']}", f"data.val_path={files['val']}", f"data.test_path={files['test']}",
           f"seed={seed}", "threads=1", "eval.n_samples=10", *extra]
    if iterations:
        cmd.append(f"train.iterations={iterations}")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"test_nll_nats": m["test_nll_nats"], "val_nll_nats": m.get("best_val_nll_nats"),
            "iterations_run": m.get("iterations"), "best_iteration": m.get("best_iteration"),
            "stopped_early": m.get("stopped_early"), "iterations_cap": iterations, "wall_s": wall,
            "cpu_s": cpu, "overrides": list(extra)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES + tuple(SYNTH))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["gmm", "kde", "tabular"])
    ap.add_argument("--iters-fm", type=int, default=None, help="cap on train.iterations of tabular / tabular-fm")
    ap.add_argument("--iters-cnf", type=int, default=None, help="cap on train.iterations of tabular-cnf")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every fastcnf fit")
    ap.add_argument("--synth-val-rows", type=int, default=1000, help="validation rows of a synthetic table")
    ap.add_argument("--synth-test-rows", type=int, default=2000, help="test rows of a synthetic table")
    ap.add_argument("--gmm-rows", type=int, default=100_000, help="GaussianMixture's fit subsample (synthetic)")
    ap.add_argument("--kde-rows", type=int, default=20_000, help="KernelDensity's fit subsample (synthetic)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tabular.json"))
    args = ap.parse_args(argv)
    meta = run_metadata(__file__, argv)
    result: dict = {**meta, "load_average_start": load_average(), "tables": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tables:
            synth = name in SYNTH
            if synth:
                full = synthetic_table(name)
                shape = [sum(len(a) for a in full), full[0].shape[1]]
            else:
                x = load_table(name)
                shape = list(x.shape)
            rows = result["tables"].setdefault(name, {"shape": shape, "runs": []})
            for seed in args.seeds:
                if synth:  # the MAF split sizes; selection and test on the first rows, the same for all
                    train, val, test = full[0], full[1][:args.synth_val_rows], full[2][:args.synth_test_rows]
                else:
                    train, val, test = split(x, seed)
                files = {k: Path(tmp) / f"{name}_{seed}_{k}.npy" for k in ("train", "val", "test")}
                for k, a in zip(("train", "val", "test"), (train, val, test)):
                    np.save(files[k], a)
                rows.update(train_rows=len(train), val_rows=len(val), test_rows=len(test), columns=train.shape[1])
                run = {"seed": seed}
                for method in args.methods:
                    if method == "gmm":
                        run[method] = gaussian_mixture(train, val, test, seed, args.gmm_rows if synth else None)
                    elif method == "kde":
                        run[method] = kernel_density(train, val, test, seed, args.kde_rows if synth else None)
                    else:
                        iters = args.iters_cnf if method == "tabular-cnf" else args.iters_fm
                        run[method] = fastcnf_fit(method, files, seed, iters, Path(tmp) / f"{name}_{seed}_{method}",
                                                  args.set)
                    print(f"{name} seed {seed} {method}: test NLL {run[method]['test_nll_nats']:.3f} nats, "
                          f"{run[method]['wall_s']:.1f} s wall, {run[method].get('cpu_s', float('nan')):.1f} s CPU",
                          flush=True)
                rows["runs"].append(run)
            rows["summary"] = {m: {"test_nll_nats": mean_std(r[m]["test_nll_nats"] for r in rows["runs"]),
                                   "wall_s": mean_std(r[m]["wall_s"] for r in rows["runs"]),
                                   **({"cpu_s": mean_std(r[m]["cpu_s"] for r in rows["runs"])}
                                      if "cpu_s" in rows["runs"][0][m] else {})}
                               for m in args.methods}
            result["load_average_end"] = load_average()
            write_json(args.out, result)
    print(json.dumps({n: t["summary"] for n, t in result["tables"].items()}, indent=1))


if __name__ == "__main__":
    main()

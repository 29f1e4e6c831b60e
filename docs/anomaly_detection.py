"""The files and the figure of docs/anomaly_detection.md.

``split``: scikit-learn's breast cancer table (569 x 30; Wolberg et al., Wisconsin diagnostic),
benign tumours as the "normal" class: a permutation from ``--seed`` keeps 70% of the benign rows
for training (``normal_train.csv``) and holds out the other benign rows (``test_normal.csv``) and
every malignant row (``test_abnormal.csv``), with a header of the column names.

``roc``: reads the log-densities that ``fastcnf score`` wrote for the two held-out files, takes
``-log p`` as the anomaly score, and prints scikit-learn's ROC AUC; draws the ROC curve and the
two histograms of ``log p`` to ``--figure``.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def split(out: Path, seed: int) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y, names = data.data, data.target, [n.replace(" ", "_") for n in data.feature_names]
    benign, malignant = x[y == 1], x[y == 0]  # scikit-learn's target: 0 malignant, 1 benign
    perm = np.random.default_rng(seed).permutation(len(benign))
    n_train = int(round(0.7 * len(benign)))
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("normal_train", benign[perm[:n_train]]), ("test_normal", benign[perm[n_train:]]),
                       ("test_abnormal", malignant)):
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            w.writerows(rows.tolist())
        print(f"{out / name}.csv: {len(rows)} rows x {rows.shape[1]} columns")


def roc(normal: Path, abnormal: Path, figure: Path, result: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    lp_n, lp_a = np.load(normal), np.load(abnormal)
    labels = np.r_[np.zeros(len(lp_n)), np.ones(len(lp_a))]
    score = -np.r_[lp_n, lp_a]  # anomaly score: low density is abnormal
    auc = float(roc_auc_score(labels, score))
    fpr, tpr, _ = roc_curve(labels, score)
    print(f"ROC AUC {auc:.4f} ({len(lp_n)} normal, {len(lp_a)} abnormal held-out rows); "
          f"median log p: normal {np.median(lp_n):.2f}, abnormal {np.median(lp_a):.2f} nats")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(fpr, tpr, label=f"-log p (AUC {auc:.3f})")
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false positive rate (benign flagged)", ylabel="true positive rate (malignant flagged)",
          title="ROC, held-out rows")
    a.legend(loc="lower right")
    lo = np.percentile(np.r_[lp_n, lp_a], 1)
    bins = np.linspace(lo, max(lp_n.max(), lp_a.max()), 40)
    b.hist(np.clip(lp_n, lo, None), bins=bins, alpha=0.6, label="benign (normal)")
    b.hist(np.clip(lp_a, lo, None), bins=bins, alpha=0.6, label="malignant (abnormal)")
    b.set(xlabel="log p(x), nats (clipped at the 1st percentile)", ylabel="rows",
          title="fastcnf score")
    b.legend()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")
    if result is not None:
        result.write_text(json.dumps({"roc_auc": auc, "normal_rows": len(lp_n), "abnormal_rows": len(lp_a),
                                      "median_log_p_normal": float(np.median(lp_n)),
                                      "median_log_p_abnormal": float(np.median(lp_a))}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("roc")
    r.add_argument("normal", type=Path)
    r.add_argument("abnormal", type=Path)
    r.add_argument("--figure", type=Path, required=True)
    r.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.command == "split":
        split(args.out, args.seed)
    else:
        roc(args.normal, args.abnormal, args.figure, args.json)


if __name__ == "__main__":
    main()

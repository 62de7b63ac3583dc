"""PNG figures: learning curves across head and fine-tune epochs, and the confusion matrix.

DVC renders the CSVs in plots/ itself; these PNGs are for people reading a
run's outputs without DVC (CI summaries, issue comments).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from components.atomic import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is present on CI machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(Path(path), "wb") as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")


def learning_curves(rows: Sequence[dict], fine_tune_from: int | None, path: Path) -> None:
    """Accuracy and loss per epoch (train and val); a dashed line where fine-tuning starts.

    ``rows``: dicts with epoch, accuracy, loss, val_accuracy, val_loss (head rows, then fine-tune rows).
    """
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [float(r[metric]) for r in rows], label=f"training {metric}")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], label=f"validation {metric}")
        if fine_tune_from is not None:
            ax.axvline(fine_tune_from - 0.5, color="grey", linestyle="--", label="start fine-tuning")
        ax.set_ylabel(metric)
        ax.legend(loc="lower right" if metric == "accuracy" else "upper right")
    axes[-1].set_xlabel("epoch")
    axes[0].set_title("Training and validation")
    _save(fig, path)
    plt.close(fig)


def confusion_png(counts: np.ndarray, labels: list[str], path: Path) -> None:
    plt = _pyplot()
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    ax.set_title("Confusion matrix (test split)")
    _save(fig, path)
    plt.close(fig)

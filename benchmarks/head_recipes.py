"""How the head's default recipe was chosen: 5-fold cross-validated accuracy on cached features.

    .venv/bin/python benchmarks/head_recipes.py --bottlenecks artifacts/bottlenecks

Pools every split's features, and for each recipe trains graftline's head
(components.head.build_head) on 3 folds, early-stops on the 4th (when
the recipe has patience) and scores the 5th, rotating; prints mean accuracy,
loss and epochs. The tutorial's head recipe (RMSprop 1e-4, 10 epochs) assumes
~600 steps an epoch; on a small folder that leaves the head far from trained.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from components import features, records  # noqa: E402
from components.head import build_head  # noqa: E402
from components.recipe import make_optimizer  # noqa: E402

# (name, optimizer, learning rate, dropout, max epochs, early-stopping patience or 0)
RECIPES = (
    ("tutorial: rmsprop 1e-4, 10 epochs", "rmsprop", 1e-4, 0.2, 10, 0),
    ("rmsprop 1e-4, early stop (patience 10)", "rmsprop", 1e-4, 0.2, 300, 10),
    ("adam 3e-4, dropout 0.2, early stop", "adam", 3e-4, 0.2, 300, 10),
    ("adam 1e-3, dropout 0.5, early stop", "adam", 1e-3, 0.5, 300, 10),
    ("graftline default: adam 1e-3, dropout 0.2, early stop", "adam", 1e-3, 0.2, 300, 10),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bottlenecks", required=True)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    parts = [features.read_split(args.bottlenecks, s) for s in records.SPLITS]
    y = np.concatenate([p[1] for p in parts])
    x = np.concatenate([p[2] for p in parts])
    folds = np.array_split(np.random.default_rng(0).permutation(len(y)), args.folds)
    print(f"{len(y)} photos, {x.shape[1]} features, {len(set(y.tolist()))} classes, {args.folds}-fold\n")
    print("| head recipe | CV accuracy | CV loss | epochs run |")
    print("|---|---:|---:|---:|")
    for name, optimizer, lr, dropout, epochs, patience in RECIPES:
        scores = []
        for i in range(args.folds):
            test, val = folds[i], folds[(i + 1) % args.folds]
            train = np.concatenate([f for j, f in enumerate(folds) if j not in (i, (i + 1) % args.folds)])
            keras.utils.set_random_seed(i)
            head = build_head(x.shape[1], int(y.max()) + 1, dropout)
            head.compile(make_optimizer(optimizer, lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
            stop = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)] if patience else []
            history = head.fit(x[train], y[train], batch_size=32, epochs=epochs, validation_data=(x[val], y[val]),
                               callbacks=stop, verbose=0).history
            loss, accuracy = head.evaluate(x[test], y[test], verbose=0)
            scores.append((accuracy, loss, len(history["loss"])))
        acc, loss, ran = np.mean(scores, axis=0)
        print(f"| {name} | {acc:.3f} | {loss:.3f} | {ran:.0f} |", flush=True)


if __name__ == "__main__":
    main()

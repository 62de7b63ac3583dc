"""The digits transfer recipe's first half: a small CNN trained on digits 0-4, saved as a base.

Keras' classic example trains a CNN on MNIST digits 0-4, then transfers its
feature layers to 5-9. graftline does the same offline with scikit-learn's
bundled 8x8 digits (1,797 images), upscaled to ``image_size`` RGB:

    graftline pretrain-digits          # writes data/digits/
    graftline preset digits && dvc repro   # transfer to 5-9 via base.model keras:data/digits/cnn_0_4.keras
    graftline scratch                  # the same CNN from random weights on 5-9, same epoch budget

Outputs under ``out``: ``digits_0_4/<digit>/*.png`` and ``digits_5_9/<digit>/*.png``
(photo folders in graftline's layout), ``cnn_0_4.keras`` (its feature layer is
named ``features``) and ``pretrain.json`` (its accuracy on held-out 0-4 digits).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from components.atomic import atomic_dir, write_json

FEATURE_LAYER = "features"
MODEL_FILE = "cnn_0_4.keras"
LEARNING_RATE = 1e-3


def digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB [n, size, size, 3] (ink white on black) and labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR)) for g in grey])
    return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


def build_cnn(image_size: int, num_classes: int):
    """The Keras transfer example's CNN: two conv blocks (features) + dense classifier."""
    import keras

    from components.images import ImagePreprocessing

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = ImagePreprocessing("tf", name="scale")(inputs)  # normalises inside: usable as a "raw" base
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Dropout(0.25, name="dropout1")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name=FEATURE_LAYER)(x)
    x = keras.layers.Dropout(0.5, name="dropout2")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def write_folders(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"digit_{i:04d}.png")


def run(out: Path, image_size: int = 32, epochs: int = 5, seed: int = 42) -> dict:
    """Write the two photo folders and the CNN pretrained on 0-4; returns its held-out accuracy."""
    import keras

    started = time.time()
    images, labels = digit_images(image_size)
    lower = labels < 5
    rng = np.random.default_rng(seed)
    order = rng.permutation(int(lower.sum()))
    x, y = images[lower][order], labels[lower][order]
    held_out = len(x) // 5
    model = build_cnn(image_size, 5)
    model.compile(keras.optimizers.Adam(LEARNING_RATE), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[held_out:], y[held_out:], batch_size=32, epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(x[:held_out], y[:held_out], verbose=0)

    out = Path(out)
    with atomic_dir(out) as tmp:
        write_folders(images[lower], labels[lower], tmp / "digits_0_4")
        write_folders(images[~lower], labels[~lower], tmp / "digits_5_9")
        model.save(tmp / MODEL_FILE)
        report = {"image_size": image_size, "epochs": epochs, "train_images": int(len(x) - held_out),
                  "held_out_accuracy_0_4": round(float(accuracy), 6),
                  "images_5_9": int((~lower).sum()), "feature_layer": FEATURE_LAYER,
                  "wall_time_s": round(time.time() - started, 2)}
        write_json(tmp / "pretrain.json", report)
    return report

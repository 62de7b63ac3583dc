"""One photo per forward pass wherever a figure is compared: evaluate, predict, scratch, the TFLite check.

On a CPU a photo's outputs change in their last bits with the batch it is
computed in: its size, and the photo's position in it (oneDNN vectorises
across the batch, differently with AVX-512 and AVX2). No batching scheme
reproduces them on every CPU. A photo run alone meets the same arithmetic
every time on a given machine, so these figures do not depend on which other
photos were evaluated with it, or on how many there were.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def alone(model, image_size: int):
    """A tf.function running ``model`` on exactly one [image_size, image_size, 3] image at a time."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32)])
    def infer(image):
        return model(image, training=False)

    return infer


def probabilities(model, image_size: int, images: Iterable) -> np.ndarray:
    """[n, classes] outputs of ``model`` for each [image_size, image_size, 3] image, one forward pass each."""
    infer = alone(model, image_size)
    out = [infer(np.asarray(image, np.float32)[None]).numpy()[0] for image in images]
    return np.stack(out) if out else np.zeros((0, 0), np.float32)

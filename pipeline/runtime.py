"""Process-wide setup both adapters do before a stage: quiet logs, seeds, determinism."""
from __future__ import annotations

import os
import random
import warnings

# Set before TensorFlow is imported anywhere: its C++ INFO lines drown the progress bars.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras says this at the end of every first epoch over a tf.data.Dataset of unknown length.
warnings.filterwarnings("ignore", message="Your input ran out of data")


def configure(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and turn on op determinism (same params -> same metrics)."""
    import keras
    import numpy as np
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)  # also seeds tf.random and Python's hash-free RNGs
    tf.config.experimental.enable_op_determinism()


"""Which engine runs the frozen backbone's forward passes in the bottleneck (``bottleneck.engine``).

- ``litert``: the extractor converted to a float32 LiteRT (TFLite) model, run by ai_edge_litert's interpreter,
  whose XNNPACK kernels are chosen for the CPU at run time. On the default's depthwise and 1x1 convolutions
  it is faster than TensorFlow's CPU kernels, with far less memory (benchmarks/engines.py, docs/results.md).
  Its features differ from TensorFlow's in the last bits (summation order, FMA): the tests state the
  tolerance (``FEATURE_TOLERANCE``).
- ``tensorflow``: the Keras extractor in a ``tf.function`` (what the rest of the pipeline runs).
- ``auto``: TensorFlow where a GPU is visible, LiteRT on a CPU; TensorFlow too, with a line saying why, when
  the converter cannot take the model (``litert`` fails instead).

Two stages choose an engine: the bottleneck (``bottleneck.engine``, the frozen backbone) and evaluate
(``evaluate.engine``, the whole exported classifier).

Photos are decoded and resized by TensorFlow either way (components/images.py: one preprocessing path); each
base's own preprocessing is part of the extractor, so it is part of the converted model.

The conversion freezes the extractor's variables into constants before converting its concrete function.
``TFLiteConverter.from_concrete_functions`` on the unfrozen function keeps every weight as a resource
variable that nothing initialises: the file holds no weights, its features are NaN, and convolutions whose
filters are not constants cannot go to XNNPACK (a few photos/s on reference kernels).
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

ENGINES = ("auto", "litert", "tensorflow")
# Largest difference between LiteRT's and TensorFlow's features of a photo, relative to that photo's
# largest feature (the tests hold the engine to it; float32 rounding, not a different model).
FEATURE_TOLERANCE = 1e-4


def resolve(engine: str) -> str:
    """``auto`` as the engine this machine runs: TensorFlow on a GPU, LiteRT on a CPU."""
    if engine != "auto":
        return engine
    import tensorflow as tf

    return "tensorflow" if tf.config.list_physical_devices("GPU") else "litert"


def litert_or_fallback(setting: str, stage: str, subject: str, convert):
    """``convert()``'s LiteRT model(s) and the seconds the conversion took; (None, None) when ``setting`` is
    ``auto`` and the converter cannot take ``subject``, with a line saying so (the stage then runs TensorFlow).
    With ``setting`` ``litert`` the failure is one line naming the param (``<stage>.engine``)."""
    import time

    from components.errors import GraftlineError

    started = time.time()
    try:
        content = convert()
    except Exception as error:  # the converter's errors have no common type
        why = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]
        if setting == "litert":
            raise GraftlineError(f"{stage}.engine: litert cannot convert {subject} ({why}); "
                                 f"set {stage}.engine: tensorflow (or auto)") from None
        print(f"{stage}: LiteRT cannot convert {subject} ({why}); running it on TensorFlow", flush=True)
        return None, None
    return content, round(time.time() - started, 2)


def backbone_to_litert(backbone, extractor) -> list[bytes]:
    """The backbone's extractor as one LiteRT model per base (Backbone.parts): converting the default's three
    bases at once took over 2 GB at its peak, one at a time about 1.4 GB."""
    models = []
    for part in backbone.parts(extractor):
        models.append(to_litert(part))
        release_freed_memory()  # the frozen graph and the converter's copies of this part's weights
    return models


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc's malloc_trim): the converter's
    freed memory otherwise stays in the process's RSS for the rest of the stage."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def to_litert(extractor) -> bytes:
    """The extractor as a float32 LiteRT model taking [1, size, size, 3] photos in [0, 255]; builtin ops only."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = float32_twin(extractor)  # no float16 kernels in TFLite
    size = int(model.input_shape[1])
    infer = tf.function(lambda pixels: model(pixels, training=False),
                        input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="images")])
    frozen = convert_variables_to_constants_v2(infer.get_concrete_function())
    # Without a trackable object the converter takes the frozen graph as it is (TensorFlow warns that this path
    # is deprecated); with one, it writes a SavedModel first: the same file, three times slower.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # fail here, not run Flex ops
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints what it traced
            return converter.convert()
    finally:
        absl.setLevel(level)


def float32_twin(model):
    """The model with every layer in float32: TFLite has no kernels for mixed-precision (float16) ops."""
    import keras

    from components import base_models

    if all(layer.dtype_policy.name == "float32" for layer in base_models.all_layers(model)):
        return model

    def as_float32(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=as_float32, recursive=True)
    twin.set_weights(model.get_weights())
    return twin


class LiteRT:
    """LiteRT models run side by side, one photo per invoke (batching does not speed XNNPACK up on a CPU, and
    a photo's features then do not depend on the photos beside it); their outputs joined in order."""

    def __init__(self, contents: bytes | list[bytes], threads: int = 0):
        """``threads``: XNNPACK's threads; 0 = one per core."""
        import os

        from ai_edge_litert.interpreter import Interpreter  # tf.lite.Interpreter is deprecated

        threads = threads or os.cpu_count() or 1
        self._runs = []
        for content in [contents] if isinstance(contents, bytes) else contents:
            interpreter = Interpreter(model_content=content, num_threads=threads)
            source = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(source["index"], [1, *source["shape"][1:]])
            interpreter.allocate_tensors()  # once: set_tensor after it, never before
            self._runs.append((interpreter, source["index"], interpreter.get_output_details()[0]["index"]))

    @property
    def width(self) -> int:
        return sum(int(interpreter.get_output_details()[0]["shape"][-1]) for interpreter, _, _ in self._runs)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """[n, size, size, 3] float32 in [0, 255] -> [n, width] float32."""
        out = []
        for photo in np.asarray(pixels, np.float32):
            parts = []
            for interpreter, source, target in self._runs:
                interpreter.set_tensor(source, photo[None])
                interpreter.invoke()
                parts.append(interpreter.get_tensor(target)[0])  # a copy
            out.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return np.stack(out)

"""What fine-tune leaves in artifacts/model/: every form a user deploys, checked against Keras.

- ``model.keras`` (Keras 3; graftline's layers register on ``import components.images``)
- ``saved_model/`` whose ``serve`` signature takes encoded image bytes and returns
  class names and probabilities (TF Serving, Vertex, ``tf.saved_model.load``), and whose
  ``serve_images`` signature takes decoded [0, 255] RGB images and returns probabilities
  (float32 throughout: what the TFLite files are converted from)
- ``model.tflite`` (float32) and ``model_dynamic_range.tflite`` (weights int8),
  taking decoded [0, 255] RGB images like the Keras model
- ``labels.json`` and ``labels.txt`` (one class per line, TFLite's convention)

The TFLite files are run on the test photos and their top-1 predictions
compared with Keras'; the agreement goes into the stage's metrics.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from components.atomic import write_json

# components.images, base_models and inference load Keras: they are imported where used, so that the file
# names above come without TensorFlow (predict checks its files before it loads anything).

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"
LABELS_TXT = "labels.txt"
TFLITE_FILES = {"float": "model.tflite", "dynamic_range": "model_dynamic_range.tflite"}
IMAGES_SIGNATURE = "serve_images"


def saved_model(model, labels: list[str], image_size: int, path: Path) -> None:
    import keras
    import tensorflow as tf

    from components import images

    class_names = tf.constant(labels)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        probabilities = model(images.decode_batch(image_bytes, image_size), training=False)
        top = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_index": top,
                "class_name": tf.gather(class_names, top),
                "labels": tf.broadcast_to(class_names, tf.shape(probabilities))}

    # The TFLite files are converted from this signature, not from the Keras model: that would write a
    # second SavedModel per file (about 7 s each for MobileNetV2).
    float_model = float32_twin(model)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    def serve_images(pixels):
        return float_model(pixels, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    if float_model is not model:  # a mixed-precision model: its float32 twin's weights go in too
        archive.track(float_model)
    archive.add_endpoint("serve", serve)
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images)
    archive.write_out(str(path), verbose=False)


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


def tflite(saved_model_dir: Path, quantize: bool) -> bytes:
    """TFLite from the SavedModel's float32 ``serve_images`` signature (see saved_model)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[IMAGES_SIGNATURE])
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights, float activations
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every traced signature
        return converter.convert()


def tflite_predict(content: bytes, images: np.ndarray) -> np.ndarray:
    """Class probabilities of a TFLite model for [n, size, size, 3] images in [0, 255], one photo per invoke
    (as components/inference.py runs Keras: the agreement does not depend on batching)."""
    from ai_edge_litert.interpreter import Interpreter  # LiteRT: tf.lite.Interpreter is deprecated

    interpreter = Interpreter(model_content=content)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    out = []
    for image in images:
        interpreter.set_tensor(source["index"], image[None].astype(np.float32))
        interpreter.invoke()
        out.append(interpreter.get_tensor(target["index"])[0].copy())
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def export(model, labels: list[str], image_size: int, out_dir: Path, check_images: np.ndarray | None,
           tflite_kinds=tuple(TFLITE_FILES)) -> dict:
    """Write every form into ``out_dir`` (TFLite: the ``tflite_kinds`` asked for); returns TFLite sizes and
    top-1 agreement with Keras."""
    from components import inference

    out_dir = Path(out_dir)
    model.save(out_dir / MODEL_FILE)
    write_json(out_dir / LABELS_FILE, labels)
    (out_dir / LABELS_TXT).write_text("".join(f"{name}\n" for name in labels))
    saved_model(model, labels, image_size, out_dir / SAVED_MODEL_DIR)

    checked = check_images is not None and len(check_images) > 0 and len(tflite_kinds) > 0
    keras_top1 = inference.probabilities(model, image_size, check_images).argmax(axis=1) if checked else None
    summary = {}
    for kind, name in TFLITE_FILES.items():
        if kind not in tflite_kinds:
            continue
        content = tflite(out_dir / SAVED_MODEL_DIR, quantize=kind == "dynamic_range")
        (out_dir / name).write_bytes(content)
        entry = {"file": name, "bytes": len(content)}
        if keras_top1 is not None:
            agree = tflite_predict(content, check_images).argmax(axis=1) == keras_top1
            entry["top1_agreement"] = round(float(np.mean(agree)), 6)
            entry["checked_photos"] = len(check_images)
        summary[kind] = entry
    return summary

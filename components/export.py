"""What fine-tune leaves in artifacts/model/: every form a user deploys, checked against Keras.

- ``model.keras`` (Keras 3; graftline's layers register on ``import components.images``)
- ``saved_model/`` whose ``serve`` signature takes encoded image bytes and returns
  class names and probabilities (TF Serving, Vertex, ``tf.saved_model.load``), and whose
  ``serve_images`` signature takes decoded [0, 255] RGB images and returns probabilities
  (float32 throughout: what the TFLite files are converted from)
- ``model.tflite`` (float32) and ``model_dynamic_range.tflite`` (weights int8),
  taking decoded [0, 255] RGB images like the Keras model
- ``labels.json`` and ``labels.txt`` (one class per line, TFLite's convention)
- ``MODEL_CARD.md``: each form's inputs and outputs, for whoever deploys the folder

Every form expects upright pixels. ``serve`` decodes with ``tf.io.decode_image``
(components/images.py), which does not read EXIF: a photo whose EXIF orientation
tag says to turn it (a phone photo taken sideways, orientation 6) reaches the model
as stored, on its side, and gets another answer than the upright photo. Clients
turn such photos first, as ``graftline predict`` does (components/photos.py:
``ImageOps.exif_transpose``, then PNG); tests/test_serving_orientation.py pins both
halves: predict on an orientation-6 JPEG equals ``serve`` on the upright pixels, and
``serve`` on the file's own bytes ignores the tag.

The TFLite files are run on the test photos and their top-1 predictions
compared with Keras'; the agreement goes into the stage's metrics.

``whole_folder_labels`` and ``load_serve`` read a folder back (``graftline predict``):
a missing, cut-short or mismatched file is one line naming the folder and the file.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from components import engines
from components.atomic import write_json
from components.errors import GraftlineError

# components.images, base_models and inference load Keras: they are imported where used, so that the file
# names above come without TensorFlow (predict checks its files before it loads anything).

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"
LABELS_TXT = "labels.txt"
MODEL_CARD = "MODEL_CARD.md"
TFLITE_FILES = {"float": "model.tflite", "dynamic_range": "model_dynamic_range.tflite"}
SERVE_SIGNATURE = "serve"
IMAGES_SIGNATURE = "serve_images"
# Inside SAVED_MODEL_DIR: the graph, and the checkpoint (an index and data shards) holding the weights.
GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")  # TensorFlow reads either; export writes the first
VARIABLES_INDEX = "variables/variables.index"
VARIABLES_SHARDS = "variables/variables.data-*-of-*"
# What a damaged or incomplete model folder's one line ends with (DVC asks before it overwrites a changed
# file, and a non-interactive run stops there: hence --force).
REEXPORT = "restore it (`dvc checkout --force {folder}`) or export it again (`dvc repro fine_tune`)"


def saved_model(model, labels: list[str], image_size: int, path: Path, max_pixels: int) -> None:
    import keras
    import tensorflow as tf

    from components import images

    class_names = tf.constant(labels)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        """Encoded JPEG/PNG/GIF/BMP files -> probabilities. The EXIF orientation tag is not read: send upright
        pixels (see the module docstring and MODEL_CARD.md). Photos above ``max_pixels`` are refused from their
        headers, before anything is decoded."""
        with tf.control_dependencies([images.refuse_above(image_bytes, max_pixels)]):
            decoded = images.decode_batch(image_bytes, image_size)
        probabilities = model(decoded, training=False)
        top = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_index": top,
                "class_name": tf.gather(class_names, top),
                "labels": tf.broadcast_to(class_names, tf.shape(probabilities))}

    # The TFLite files are converted from this signature, not from the Keras model: that would write a
    # second SavedModel per file (about 7 s each for MobileNetV2).
    float_model = engines.float32_twin(model)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    def serve_images(pixels):
        return float_model(pixels, training=False)

    # Keras' ExportArchive saves the variables the endpoints use (the float32 twin's too, for a mixed-precision
    # model). Not track(model): the model holds no lookup table, and track() saves every weight a second time
    # under other objects (keras-team/keras#23553): twice the folder, the memory of whoever loads it, and the
    # time to write it and to convert it to TFLite (docs/results.md).
    archive = keras.export.ExportArchive()
    archive.add_endpoint(SERVE_SIGNATURE, serve)
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images)
    archive.write_out(str(path), verbose=False)


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
    return engines.LiteRT(content)(images) if len(images) else np.zeros((0, 0), np.float32)


def model_card(labels: list[str], image_size: int, tflite_kinds: tuple[str, ...], max_pixels: int) -> str:
    """MODEL_CARD.md: what each form in the folder takes and returns (no date or machine: the same model
    gives the same card)."""
    size = f"{image_size} x {image_size}"
    tflite = [f"`{TFLITE_FILES[kind]}`" for kind in TFLITE_FILES if kind in tflite_kinds]
    lines = [
        f"# Image classifier: {len(labels)} classes",
        "",
        "Exported by graftline's fine-tune stage. Classes, in the order of the model's outputs "
        f"(`{LABELS_FILE}`, `{LABELS_TXT}`): {', '.join(labels)}.",
        "",
        "## Inputs: upright pixels",
        "",
        "Every form below expects the photo upright. The EXIF orientation tag is not read: a phone photo "
        "stored on its side with a tag saying to turn it (orientations 2-8; 6 for a phone held upright) "
        "reaches the model on its side and gets another answer. Turn it before encoding, e.g. with Pillow's "
        "`ImageOps.exif_transpose`, as `graftline predict` does.",
        "",
        f"- `{SAVED_MODEL_DIR}/`, signature `{SERVE_SIGNATURE}`: `image_bytes`, a batch (string tensor) of "
        "encoded JPEG, PNG, GIF (first frame) or BMP files. Decoded with `tf.io.decode_image` and resized to "
        f"{size} (bilinear, no crop) inside the graph. Returns `probabilities` [batch, {len(labels)}], "
        f"`class_index`, `class_name` and `labels`. A batch with a photo above {max_pixels:,} pixels (as its "
        "header states; the project's `data.max_pixels`) is refused before anything is decoded.",
        f"- `{SAVED_MODEL_DIR}/`, signature `{IMAGES_SIGNATURE}`: `images`, float32 [batch, {image_size}, "
        f"{image_size}, 3], RGB in [0, 255]. Returns the probabilities.",
        f"- `{MODEL_FILE}` (Keras 3; `import components.images` first): the same input as `{IMAGES_SIGNATURE}`.",
    ]
    if tflite:
        lines.append(f"- {' and '.join(tflite)}: as `{IMAGES_SIGNATURE}` (converted from it); the batch is 1 "
                     "until `resize_tensor_input`.")
    return "\n".join(lines) + "\n"


def export(model, labels: list[str], image_size: int, out_dir: Path, check_images: np.ndarray | None,
           tflite_kinds: tuple[str, ...], max_pixels: int) -> dict:
    """Write every form into ``out_dir`` (TFLite: the ``tflite_kinds`` asked for); returns TFLite sizes and
    top-1 agreement with Keras. ``serve`` refuses photos above ``max_pixels`` (data.max_pixels)."""
    from components import inference

    out_dir = Path(out_dir)
    model.save(out_dir / MODEL_FILE)
    write_json(out_dir / LABELS_FILE, labels)
    (out_dir / LABELS_TXT).write_text("".join(f"{name}\n" for name in labels))
    (out_dir / MODEL_CARD).write_text(model_card(labels, image_size, tflite_kinds, max_pixels))
    saved_model(model, labels, image_size, out_dir / SAVED_MODEL_DIR, max_pixels)

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


# ---------------------------------------------------------------- reading an exported folder back (predict)


def damaged(model_dir: Path, what: str) -> GraftlineError:
    """The one line for a model folder with a file missing, cut short or not matching the others."""
    return GraftlineError(f"{model_dir}: {what}; {REEXPORT.format(folder=model_dir)}")


def whole_folder_labels(model_dir: Path) -> list[str]:
    """The class names of an exported model folder, after checking without TensorFlow that every file the
    ``serve`` signature needs is there and that labels.json is a list of class names.

    Anything else raises a GraftlineError naming the folder and what is wrong. Damage inside a file that
    is there (a truncated or corrupt weights shard) shows only when TensorFlow reads it: ``load_serve``.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise GraftlineError(f"{model_dir}: no such model folder; run the pipeline (fine-tune exports it)")
    if not model_dir.is_dir():
        raise GraftlineError(f"{model_dir}: not a folder; a model is an exported folder such as artifacts/model")
    if not any(model_dir.iterdir()):
        raise GraftlineError(f"{model_dir}: the model folder is empty; run the pipeline (fine-tune exports it)")
    missing = missing_files(model_dir)
    if missing:
        listed = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise damaged(model_dir, f"incomplete model folder, {listed} missing")
    return read_labels(model_dir)


def missing_files(model_dir: Path) -> list[str]:
    """The files (relative to ``model_dir``) that loading the ``serve`` signature and naming its classes need
    and that are not there."""
    saved = Path(model_dir) / SAVED_MODEL_DIR
    missing = []
    if not saved.is_dir():
        missing.append(f"{SAVED_MODEL_DIR}/")
    else:
        if not any((saved / name).is_file() for name in GRAPH_FILES):
            missing.append(f"{SAVED_MODEL_DIR}/{GRAPH_FILES[0]}")
        if not (saved / VARIABLES_INDEX).is_file():
            missing.append(f"{SAVED_MODEL_DIR}/{VARIABLES_INDEX}")
        missing += [f"{SAVED_MODEL_DIR}/variables/{name}" for name in missing_shards(saved)]
    if not (Path(model_dir) / LABELS_FILE).is_file():
        missing.append(LABELS_FILE)
    return missing


def missing_shards(saved_model_dir: Path) -> list[str]:
    """Data shards of the weights checkpoint that are not there; each shard's name says how many there are."""
    import re

    names = {p.name for p in Path(saved_model_dir).glob(VARIABLES_SHARDS)}
    counts = {int(m[1]) for m in (re.fullmatch(r"variables\.data-\d{5}-of-(\d{5})", n) for n in names) if m}
    if not counts:
        return ["variables.data-00000-of-00001 (the weights)"]
    return sorted({f"variables.data-{i:05d}-of-{n:05d}" for n in counts for i in range(n)} - names)


def read_labels(model_dir: Path) -> list[str]:
    """labels.json: a list of distinct class names, in the order of the model's outputs."""
    import json

    model_dir = Path(model_dir)
    try:
        labels = json.loads((model_dir / LABELS_FILE).read_bytes())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise damaged(model_dir, f"{LABELS_FILE} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise damaged(model_dir, f"cannot read {LABELS_FILE} ({exc.strerror})") from None
    if not (isinstance(labels, list) and labels and all(isinstance(name, str) and name for name in labels)):
        raise damaged(model_dir, f"{LABELS_FILE} is not a list of class names (one per model output)")
    twice = sorted({name for name in labels if labels.count(name) > 1})
    if twice:
        raise damaged(model_dir, f"{LABELS_FILE} names {', '.join(map(repr, twice))} more than once")
    return labels


def load_serve(model_dir: Path, labels: list[str]):
    """The SavedModel's ``serve`` signature, its outputs checked against ``labels``.

    TensorFlow's load errors (a cut-short or corrupt weights shard fails only here, when the weights are
    restored; a damaged graph or index) become a GraftlineError naming the folder and the damaged file.
    """
    import tensorflow as tf

    model_dir = Path(model_dir)
    try:
        loaded = tf.saved_model.load(str(model_dir / SAVED_MODEL_DIR))
    except (tf.errors.OpError, OSError, ValueError, IndexError, RuntimeError) as exc:
        raise damaged(model_dir, damage(model_dir / SAVED_MODEL_DIR, exc)) from None
    serve = loaded.signatures.get(SERVE_SIGNATURE)
    if serve is None:
        raise damaged(model_dir, f"{SAVED_MODEL_DIR}/ has no `{SERVE_SIGNATURE}` signature (it has "
                                 f"{', '.join(sorted(loaded.signatures)) or 'none'})")
    probabilities = serve.structured_outputs.get("probabilities")
    classes = probabilities.shape[-1] if probabilities is not None and probabilities.shape.rank else None
    if classes != len(labels):
        raise damaged(model_dir, f"{LABELS_FILE} names {len(labels)} classes but the model outputs {classes or 'no'} "
                                 "class probabilities: they are from different exports")
    return serve


def damage(saved_model_dir: Path, error: Exception) -> str:
    """Which file of a SavedModel that TensorFlow could not load is damaged, found by reading each one."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model_dir = Path(saved_model_dir)
    graph = saved_model_dir / GRAPH_FILES[0]
    if graph.is_file():
        try:
            saved_model_pb2.SavedModel().ParseFromString(graph.read_bytes())
        except DecodeError:
            return f"{SAVED_MODEL_DIR}/{graph.name} is damaged or cut short (not a SavedModel protobuf)"
    try:
        reader = tf.train.load_checkpoint(str(saved_model_dir / VARIABLES_INDEX.removesuffix(".index")))
    except (tf.errors.OpError, ValueError, RuntimeError) as exc:
        return f"{SAVED_MODEL_DIR}/{VARIABLES_INDEX} is damaged or cut short ({tf_reason(exc)})"
    for key in sorted(reader.get_variable_to_shape_map()):
        try:
            reader.get_tensor(key)
        except (tf.errors.OpError, IndexError, ValueError, RuntimeError) as exc:
            shards = sorted(p.name for p in saved_model_dir.glob(VARIABLES_SHARDS))
            shard = f"variables/{shards[0]}" if len(shards) == 1 else "variables/variables.data-* (the weights)"
            return f"{SAVED_MODEL_DIR}/{shard} is cut short or damaged ({tf_reason(exc)})"
    return f"TensorFlow cannot load {SAVED_MODEL_DIR}/ ({tf_reason(error)})"


def tf_reason(error: Exception) -> str:
    """The gist of a TensorFlow error: its first line, without op names and the file's path."""
    import re

    text = (getattr(error, "message", None) or str(error) or type(error).__name__).strip().splitlines()[0]
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)  # {{function_node __wrapped__RestoreV2_...}}
    text = re.sub(r"\s*\[Op:\w+\]$", "", text)
    text = re.sub(r"^TensorBundle at \S+ shard \d+ \(\d+ bytes\): ", "", text)
    return text if len(text) <= 200 else text[:197] + "..."

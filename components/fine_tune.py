"""Stage 4, fine-tune: base + the trained head, base layers from ``fine_tune_at`` up trainable.

The full model is ``[0, 255] RGB -> preprocessing -> base (BatchNorm always in
inference mode) -> head``, trained on the TFRecords with the tutorial's
augmentation (training only) at ``fine_tune.learning_rate``.
``fine_tune.epochs: 0`` exports base + head unchanged.

Outputs: ``model`` (model.keras, saved_model/ whose ``serve`` signature takes
encoded image bytes and returns class names and probabilities, labels.json),
``metrics``, ``plots`` (epochs numbered after the head's so the curves join),
``report`` (wall time, layer counts; devices, strategy and dtype policy from
components.devices).
"""
from __future__ import annotations

import time
from pathlib import Path

from components import base_models, devices, images, records
from components.atomic import atomic_dir, read_json, write_csv, write_json
from components.errors import GraftlineError
from components.train_head import CURVE_COLUMNS, HEAD_FILE, HEAD_INFO, curve_rows, keras_verbosity, make_optimizer

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"
SHUFFLE_BUFFER = 2048  # serialized photos held for shuffling; the whole split on small folders


def build_classifier(params, head):
    """Feature extractor + head as one model; returns (model, base) with base layers frozen below fine_tune_at."""
    import keras

    b = params.base
    weights_path = base_models.resolve_weights(b.model, b.alpha, b.image_size, b.weights)
    extractor = base_models.build_feature_extractor(b.model, b.alpha, b.image_size, weights_path)
    base = base_models.base_of(extractor)
    n_layers = len(base.layers)
    if params.fine_tune_at > n_layers:
        raise GraftlineError(
            f"params: fine_tune_at = {params.fine_tune_at} is past the end of {b.model}, which has "
            f"{n_layers} layers; use 0..{n_layers} (0 trains all, {n_layers} none) or -1 to freeze the base."
        )
    base.trainable = params.fine_tune_at != -1
    for layer in base.layers[: max(params.fine_tune_at, 0)]:
        layer.trainable = False
    inputs = keras.Input((b.image_size, b.image_size, 3), name="image")
    model = keras.Model(inputs, head(extractor(inputs)), name="classifier")
    return model, base


def augmenter(params):
    """The training-only augmentation layers (None when all are off)."""
    import keras

    a = params.augment
    layers = []
    if a.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=params.seed))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=params.seed))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, seed=params.seed))
    return keras.Sequential(layers, name="augment") if layers else None


def image_dataset(examples_dir: Path, split: str, image_size: int, batch_size: int,
                  shuffle_seed: int | None = None, augment=None):
    """(images [0, 255], labels) batches of one split, decoded by the one image path."""
    import tensorflow as tf

    ds = records.dataset(examples_dir, split)
    if shuffle_seed is not None:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda ex: (images.decode_and_resize(ex[records.IMAGE], image_size), ex[records.LABEL]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_batch_size(examples_dir: Path, split: str, placement: dict) -> int:
    """The global batch size, made to split evenly over several replicas (see devices.batch_for)."""
    import tensorflow as tf

    replicas, global_batch = placement["replicas"], placement["global_batch_size"]
    if replicas == 1:
        return global_batch  # no need to count the photos
    paths = [str(p) for p in records.shard_paths(examples_dir, split)]
    count = int(tf.data.TFRecordDataset(paths, compression_type=records.COMPRESSION).reduce(0, lambda n, _: n + 1))
    return devices.batch_for(global_batch, replicas, count, f"fine-tune: {split} split")


def export(model, labels: list[str], image_size: int, out_dir: Path) -> None:
    """model.keras, labels.json and a SavedModel whose ``serve`` takes encoded image bytes."""
    import keras
    import tensorflow as tf

    model.save(out_dir / MODEL_FILE)
    write_json(out_dir / LABELS_FILE, labels)
    class_names = tf.constant(labels)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        probabilities = model(images.decode_batch(image_bytes, image_size), training=False)
        top = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_index": top,
                "class_name": tf.gather(class_names, top),
                "labels": tf.broadcast_to(class_names, tf.shape(probabilities))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve)
    archive.write_out(str(out_dir / SAVED_MODEL_DIR), verbose=False)


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples, labels, head. outputs: model (folder), metrics, plots, report."""
    import keras

    started = time.time()
    f = params.fine_tune
    labels = read_json(Path(inputs["labels"]))
    head_dir = Path(inputs["head"])
    head_info = read_json(head_dir / HEAD_INFO)
    if head_info["labels"] != labels:
        raise GraftlineError(f"{head_dir} was trained on classes {head_info['labels']}, not {labels}; re-run train-head")
    # Device setup was done by the adapter (pipeline/runtime.py); here it is only read. Every
    # variable (head, base, optimizer) is made in the strategy's scope, so it is mirrored on each GPU.
    strategy = devices.strategy()
    placement = devices.placement(strategy, f.batch_size)
    with strategy.scope():
        head = keras.saving.load_model(head_dir / HEAD_FILE)
        model, base = build_classifier(params, head)
        model.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    examples = Path(inputs["examples"])
    size = params.base.image_size
    batch_size = {split: split_batch_size(examples, split, placement) for split in ("train", "val")}
    val = image_dataset(examples, "val", size, batch_size["val"])

    rows = []
    if f.epochs > 0:
        train = image_dataset(examples, "train", size, batch_size["train"], shuffle_seed=params.seed,
                              augment=augmenter(params))
        history = model.fit(train, validation_data=val, epochs=f.epochs, shuffle=False,  # shuffled above, by seed
                            verbose=keras_verbosity()).history
        rows = curve_rows(history, head_info["epochs_run"] + 1)
        final = {c: history[c][-1] for c in CURVE_COLUMNS[1:]}
    else:  # nothing trained: report what base + head score as they are
        train = image_dataset(examples, "train", size, batch_size["train"])
        loss, accuracy = model.evaluate(train, verbose=0)
        val_loss, val_accuracy = model.evaluate(val, verbose=0)
        final = {"accuracy": accuracy, "loss": loss, "val_accuracy": val_accuracy, "val_loss": val_loss}

    with atomic_dir(Path(outputs["model"])) as tmp:
        export(model, labels, size, tmp)
    write_csv(Path(outputs["plots"]), CURVE_COLUMNS, rows)
    metrics = {k: round(float(v), 6) for k, v in final.items()}
    metrics.update({"epochs": f.epochs, "fine_tune_at": params.fine_tune_at,
                    "trainable_base_layers": sum(1 for layer in base.layers if layer.trainable)})
    write_json(Path(outputs["metrics"]), metrics)
    report = {"wall_time_s": round(time.time() - started, 2), **placement, "batch_sizes": batch_size,
              "base_layers": len(base.layers), "trainable_weights": len(model.trainable_weights)}
    write_json(Path(outputs["report"]), report)
    return {**metrics, **report}

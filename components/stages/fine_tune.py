"""Stage 4, fine-tune: base + the trained head, base layers from ``fine_tune_at`` up trainable.

The full model is ``[0, 255] RGB -> preprocessing -> base (BatchNorm always in
inference mode) -> head``. By default it trains from cached activations
(components/activations.py): the frozen layers run once per photo and view
(the photo and its mirror), and each epoch trains only the layers from the cut
up and the head, on those activations mixed up in pairs (augment.mixup).
With image-space augmentation (augment.rotation, augment.zoom) or input noise,
every epoch runs on the decoded images instead. ``fine_tune.epochs: 0``
exports base + head unchanged; so does a run in which no epoch beat them on
val loss.

Every epoch is checkpointed (model, optimizer state, curve so far) under
``inputs["checkpoints"]``; a run that was killed resumes from its last
complete epoch when run again with the same params, head and photos.

Outputs: ``model`` (components/export.py: .keras, SavedModel taking image
bytes, TFLite float and dynamic-range with their top-1 agreement, labels; with
augment.tta: flip, every form averages over the photo and its mirror),
``metrics``, ``plots`` (epochs numbered after the head's so the curves join),
``curves`` (PNG of head and fine-tune curves with a "start fine-tuning"
marker), ``report`` (wall time and its phases, how it trained, the cut and the
cache, layer counts; devices, strategy and dtype policy from components.devices).
"""
from __future__ import annotations

import time
from pathlib import Path

import csv
import difflib
import hashlib
import json
import shutil

from components import activations, base_models, devices, export, images, multi_worker, plots
from components import callbacks as callbacks_mod
from components.atomic import atomic_dir, read_json, write_csv, write_json
from components.fetch import sha256_of
from components.errors import GraftlineError
from components.vector_cache import VectorCache
from components.datasets import augmenter, image_dataset, split_batch_size
from components.head import (CURVE_COLUMNS, HEAD_FILE, HEAD_HISTORY, HEAD_INFO, best_row, curve_row,
                             early_stopping, keras_verbosity, make_optimizer, rate_schedule, scheduled_rate)

# Test photos the TFLite models are compared with Keras on, one at a time: enough to catch a broken
# conversion. Each costs about 23 ms of Keras and 13 ms of TFLite (MobileNetV2 at 160 px, with the flip).
TFLITE_CHECK_MAX = 64
CHECKPOINT_STATE = "state.json"


def fine_tune_index(params, base) -> int:
    """``fine_tune_at`` as an index into the base's layers: an index as given, a layer name as that layer's."""
    at, names = params.fine_tune_at, [layer.name for layer in base.layers]
    if isinstance(at, str):
        if at in names:
            return names.index(at)
        nearest = difflib.get_close_matches(at, names, n=5, cutoff=0.5) or names[-3:]
        raise GraftlineError(f"params: fine_tune_at = {at!r} is not a layer of {params.base.model}; the nearest "
                             f"names: {', '.join(nearest)} (or give a layer index, 0..{len(names)})")
    if at > len(names):
        raise GraftlineError(
            f"params: fine_tune_at = {at} is past the end of {params.base.model}, which has "
            f"{len(names)} layers; use 0..{len(names)} (0 trains all, {len(names)} none), a layer name, "
            "or -1 to freeze the base."
        )
    return at


def build_classifier(params, head):
    """Feature extractor + head as one model; returns (model, base) with base layers frozen below fine_tune_at."""
    import keras

    b = params.base
    weights_path = base_models.resolve_weights(b.model, b.alpha, b.image_size, b.weights)
    extractor = base_models.extractor_for_params(params, weights_path)
    base = base_models.base_of(extractor)
    at = fine_tune_index(params, base)
    base.trainable = at != -1
    for layer in base.layers[: max(at, 0)]:
        layer.trainable = False
    # BatchNorm stays in inference mode: in Keras 3, fit's training=True overrides the
    # training=False the base is called with (keras-team/keras#20285), and only a frozen
    # BatchNormalization layer keeps its moving statistics fixed.
    for layer in base_models.all_layers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    inputs = keras.Input((b.image_size, b.image_size, 3), name="image")
    model = keras.Model(inputs, head(extractor(inputs)), name="classifier")
    return model, base


def unfrozen_layers(params, base) -> int:
    """How many base layers fine_tune_at opened for training (their BatchNorm layers stay frozen)."""
    at = fine_tune_index(params, base)
    return 0 if at == -1 else max(0, len(base.layers) - at)


def checkpoint_callback(folder: Path, fingerprint: str, done_rows: list, first_epoch: int):
    """A Keras callback: after each epoch, save model + optimizer + curve so far, atomically."""
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            done_rows.append(curve_row(first_epoch + epoch, logs))
            name = f"epoch-{epoch + 1:04d}"
            with atomic_dir(folder / name) as tmp:
                self.model.save(tmp / export.MODEL_FILE)
                write_json(tmp / CHECKPOINT_STATE, {"fingerprint": fingerprint, "epochs_done": epoch + 1,
                                                    "rows": done_rows})
            for old in folder.glob("epoch-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    return EpochCheckpoint()


def run_fingerprint(params, head_dir: Path, examples: Path) -> str:
    """What a checkpoint must match to be resumed: the stage's params, the head, the photos' shards."""
    relevant = {k: params.to_dict()[k] for k in ("seed", "fine_tune_at", "base", "input_block", "augment",
                                                  "fine_tune", "train")}
    shards = sorted((p.name, p.stat().st_size) for p in Path(examples).glob("*.tfrecord.gz"))
    blob = json.dumps([relevant, sha256_of(head_dir / HEAD_FILE), shards], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def last_checkpoint(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete epoch folder written for this fingerprint, if any."""
    for candidate in sorted(Path(folder).glob("epoch-*"), reverse=True):
        try:
            state = read_json(candidate / CHECKPOINT_STATE)
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") == fingerprint and (candidate / export.MODEL_FILE).is_file():
            return candidate
    return None


def check_images(examples: Path, image_size: int, limit: int):
    """Up to ``limit`` decoded test photos, for checking the TFLite exports against Keras."""
    import numpy as np

    batches = [x.numpy() for x, _ in image_dataset(examples, "test", image_size, 64).take(-(-limit // 64))]
    return np.concatenate(batches)[:limit] if batches else None


def joined_curve(head_dir: Path, fine_rows: list) -> list[dict]:
    with open(head_dir / HEAD_HISTORY, newline="") as handle:
        head_rows = list(csv.DictReader(handle))
    return head_rows + [dict(zip(CURVE_COLUMNS, row)) for row in fine_rows]


def uses_activations(params) -> bool:
    """Whether fine-tuning can run from cached activations: nothing random happens before the cut.

    Image-space augmentation (rotation, zoom) and the input block's noise change what the frozen
    layers compute in every epoch, so with any of them on, every epoch runs on the images.
    """
    return (params.fine_tune_at != -1 and not params.augment.rotation and not params.augment.zoom
            and not params.input_block.noise)


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples, labels, head, checkpoints. outputs: model (folder), metrics, plots, curves, report.

    With several workers (train.strategy: multi_worker) every worker trains,
    checkpoints and exports, but only the chief's files land in ``outputs`` and
    ``inputs["checkpoints"]`` (multi_worker.worker_outputs); the others' go to a
    temporary folder that is removed at the end.
    """
    # Device setup was done by the adapter (pipeline/runtime.py); here it is only read.
    strategy = devices.strategy(params.train.strategy)
    with multi_worker.worker_outputs(strategy, {**outputs, "checkpoints": inputs["checkpoints"]}, "fine-tune") as written:
        return train_and_save(params, inputs, written, strategy)


def train_and_save(params, inputs: dict, outputs: dict, strategy) -> dict:
    """run's work in the given strategy; checkpoints are read from inputs and written to outputs["checkpoints"]."""
    import keras

    started = time.time()
    f = params.fine_tune
    labels = read_json(Path(inputs["labels"]))
    head_dir = Path(inputs["head"])
    head_info = read_json(head_dir / HEAD_INFO)
    if head_info["labels"] != labels:
        raise GraftlineError(f"{head_dir} was trained on classes {head_info['labels']}, not {labels}; re-run train-head")
    placement = devices.placement(strategy, f.batch_size)
    examples = Path(inputs["examples"])
    size = params.base.image_size
    from_activations = uses_activations(params)

    # 1. Where a killed run left off: the newest checkpoint of these params, head and photos.
    checkpoints = Path(outputs["checkpoints"])
    fingerprint = run_fingerprint(params, head_dir, examples)
    # A non-chief worker reads the chief's checkpoints (shared storage) and writes its own to a temporary folder.
    resume = last_checkpoint(Path(inputs["checkpoints"]), fingerprint) if f.epochs > 0 else None
    done_rows = read_json(resume / CHECKPOINT_STATE)["rows"] if resume else []
    if not multi_worker.same_on_every_worker(strategy, len(done_rows)):
        # Workers must build the same variables and run the same epochs, or the collectives hang.
        print(f"fine-tune: starting over on every worker: they found different checkpoints (this one: "
              f"{resume or 'none'}); to resume, keep the checkpoints folder on storage every worker reads")
        resume, done_rows = None, []
    resumed_after = len(done_rows)
    if resume:
        print(f"fine-tune: resuming after epoch {resumed_after} of {f.epochs} from {resume}")

    # 2. The classifier: base (layers >= fine_tune_at trainable, BatchNorm frozen) + the trained head.
    # Every variable is made in the strategy's scope, so it is mirrored on each GPU.
    with strategy.scope():
        if resume and not from_activations:  # weights and optimizer state as the last complete epoch left them
            model = keras.saving.load_model(resume / export.MODEL_FILE)
            base = base_models.base_of(model.get_layer("feature_extractor"))
        else:
            model, base = build_classifier(params, keras.saving.load_model(head_dir / HEAD_FILE))
    batch_size = {split: split_batch_size(examples, split, placement) for split in ("train", "val")}
    first_epoch = head_info["epochs_run"] + 1
    trained_now = 0 < f.epochs and len(done_rows) < f.epochs
    callbacks = []
    if trained_now:
        callbacks.append(checkpoint_callback(checkpoints, fingerprint, done_rows, first_epoch))
        # Before the loggers: the schedule puts each epoch's rate into the logs they write (DVCLive's curves).
        callbacks += rate_schedule(f.schedule, f.learning_rate, f.epochs)
        callbacks += callbacks_mod.epoch_loggers(outputs, resumed_after=resumed_after)
        callbacks += early_stopping(f.early_stopping_patience)

    # 3. Train: from cached activations of the frozen part, or on the images every epoch.
    cached = {}
    if f.epochs > 0 and from_activations:
        cached = fit_on_activations(params, model, examples, labels, resume, done_rows, batch_size, callbacks,
                                    strategy, trained_now)
    elif f.epochs > 0 and trained_now:
        train = image_dataset(examples, "train", size, batch_size["train"], shuffle_seed=params.seed,
                              augment=augmenter(params))
        val = image_dataset(examples, "val", size, batch_size["val"])
        if not resume:
            with strategy.scope():
                model.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate),
                              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(train, validation_data=val, epochs=f.epochs, initial_epoch=len(done_rows),
                  shuffle=False, callbacks=callbacks, verbose=keras_verbosity())  # shuffled above, by seed
    if f.epochs > 0:
        rows = done_rows
        # Early stopping restores the best val-loss epoch of this session (a resumed run starts its own).
        session = rows[resumed_after:] if trained_now else rows[-1:]
        chosen = best_row(session, f.early_stopping_patience)  # session ends with rows[-1]
        final = dict(zip(CURVE_COLUMNS[1:], chosen[1:]))
        best_epoch = chosen[0]
        if "kept_base_and_head" in cached:  # no epoch improved on val loss: what train-head made, unchanged
            final, best_epoch = cached["kept_base_and_head"], None
    else:  # nothing trained: report what base + head score as they are
        rows, best_epoch = [], None
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        loss, accuracy = model.evaluate(image_dataset(examples, "train", size, batch_size["train"]), verbose=0)
        val_loss, val_accuracy = model.evaluate(image_dataset(examples, "val", size, batch_size["val"]), verbose=0)
        final = {"accuracy": accuracy, "loss": loss, "val_accuracy": val_accuracy, "val_loss": val_loss}

    # 4. Export (with the test-time flip when augment.tta is on), curves, metrics, report.
    trained_at = time.time()
    served = images.with_flip_averaged(model) if params.augment.tta == "flip" else model
    with atomic_dir(Path(outputs["model"])) as tmp:
        photos = check_images(examples, size, TFLITE_CHECK_MAX) if params.export.tflite else None
        exported = export.export(served, labels, size, tmp, photos, params.export.tflite)
    phases = {"train_s": round(trained_at - started, 2), "export_s": round(time.time() - trained_at, 2)}
    write_csv(Path(outputs["plots"]), CURVE_COLUMNS, rows)
    plots.learning_curves(joined_curve(head_dir, rows), first_epoch if rows else None, Path(outputs["curves"]))
    metrics = {k: round(float(v), 6) for k, v in final.items()}
    n_open = unfrozen_layers(params, base)
    opened = base.layers[len(base.layers) - n_open:] if n_open else []
    metrics.update({"epochs": f.epochs, "epochs_run": len(rows), "best_epoch": best_epoch,
                    "fine_tune_at": params.fine_tune_at,
                    "trainable_base_layers": len(opened),
                    "frozen_batchnorm_layers": sum(isinstance(l, keras.layers.BatchNormalization) for l in opened)})
    metrics.update({f"tflite_{kind}_top1_agreement": e["top1_agreement"]
                    for kind, e in exported.items() if "top1_agreement" in e})
    write_json(Path(outputs["metrics"]), metrics)
    report = {"wall_time_s": round(time.time() - started, 2), **phases, **placement, "batch_sizes": batch_size,
              "trained_from": "activations" if from_activations else "images", **cached,
              "base_layers": len(base.layers), "trainable_weights": len(model.trainable_weights),
              "resumed_after_epoch": resumed_after, "test_time_augmentation": params.augment.tta,
              "learning_rate": {"schedule": f.schedule, "per_epoch": [  # what rate_schedule set each epoch
                  float(f"{scheduled_rate(f.schedule, f.learning_rate, e, f.epochs):.9g}")
                  for e in range(len(rows))]},
              "tflite": exported}
    write_json(Path(outputs["report"]), report)
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: nothing left to resume
    return {**metrics, **report}


def fit_on_activations(params, classifier, examples: Path, labels: list, resume, done_rows: list,
                       batch_size: dict, callbacks: list, strategy, trained_now: bool) -> dict:
    """Fine-tune ``classifier`` from cached activations of its frozen part; returns what the report says of it.

    The frozen part runs once per photo and view (cached across runs), then every epoch
    trains only the layers from the cut up, and the head, on those activations.
    """
    import keras

    f, size = params.fine_tune, params.base.image_size
    if not trained_now:  # every epoch was done before a kill: the last checkpoint holds the weights
        activations.copy_weights(keras.saving.load_model(resume / export.MODEL_FILE), classifier)
        return {}
    extractor = classifier.get_layer("feature_extractor")
    front, top, cut = activations.split(extractor, fine_tune_index(params, base_models.base_of(extractor)))
    cut_layer = base_models.base_of(extractor).layers[cut - 1].name  # whose output is cached
    views = activations.views_for(params.augment)
    caches = activation_caches(params, front, cut_layer, views)
    computing = time.time()
    acts, labels_train, computed_train = activations.compute(front, examples, "train", views, size, caches,
                                                              f.batch_size)
    val_acts, labels_val, computed_val = activations.compute(front, examples, "val", views[:1], size, caches,
                                                             f.batch_size)
    report = {"activations": {"cut_before_layer": cut, "cut_layer": cut_layer,
                              "shape": list(acts.shape[2:]), "views": list(views),
                              "computed": computed_train + computed_val,
                              "read_from_cache": int(acts.shape[0] * acts.shape[1] + val_acts.shape[0]
                                                     - computed_train - computed_val),
                              "cache": caches[views[0]].folder if caches.get(views[0]) else None},
              "activations_s": round(time.time() - computing, 2), "mixup": params.augment.mixup}
    with strategy.scope():
        if resume:
            trained = keras.saving.load_model(resume / export.MODEL_FILE)
        else:
            inputs = keras.Input(acts.shape[2:], name="activation")
            trained = keras.Model(inputs, classifier.get_layer("head")(top(inputs, training=False)), name="top")
            trained.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate), loss="categorical_crossentropy",
                            metrics=["accuracy"])
    train = activations.batches(acts, labels_train, len(labels), batch_size["train"], params.seed,
                                params.augment.mixup, first_epoch=len(done_rows))
    val = (val_acts[:, 0].astype("float32"), keras.utils.to_categorical(labels_val, len(labels)))
    # Early stopping keeps the best epoch; on a small folder that can still be worse than base + head as they
    # came from train-head (mixup's first epochs disturb the head): then they are kept as they were.
    guard = bool(f.early_stopping_patience) and not resume
    if guard:
        start = dict(zip(("val_loss", "val_accuracy"),
                         trained.evaluate(*val, batch_size=batch_size["val"], verbose=0)))
        start_weights = trained.get_weights()
    history = trained.fit(train, validation_data=val, validation_batch_size=batch_size["val"], epochs=f.epochs,
                          initial_epoch=len(done_rows), callbacks=callbacks, verbose=keras_verbosity()).history
    if guard and min(history["val_loss"]) >= start["val_loss"]:
        trained.set_weights(start_weights)
        identity = (acts[:, 0].astype("float32"), keras.utils.to_categorical(labels_train, len(labels)))
        start.update(zip(("loss", "accuracy"), trained.evaluate(*identity, batch_size=batch_size["train"],
                                                               verbose=0)))
        report["kept_base_and_head"] = start  # no epoch beat them on val loss
    activations.copy_weights(trained, classifier)  # a no-op unless resumed: the layers are shared otherwise
    return report


def activation_caches(params, front, cut_layer: str, views) -> dict:
    """view -> VectorCache of this base's activations at the cut (bottleneck.cache_dir), or None when off."""
    b = params.base
    weights_path = base_models.resolve_weights(b.model, b.alpha, b.image_size, b.weights)
    if not params.bottleneck.cache_dir or not weights_path:  # random weights differ with the seed: never cached
        return {}
    base_fp = base_models.cache_fingerprint(b, params.input_block.upsample, weights_path)
    shape = tuple(int(d) for d in front.output_shape[1:])
    return {view: VectorCache(params.bottleneck.cache_dir, activations.fingerprint(base_fp, cut_layer, view), shape,
                              activations.STORED_DTYPE, "f16") for view in views}

"""Stage 4, fine-tune: base + the trained head, base layers from ``fine_tune_at`` up trainable.

The full model is ``[0, 255] RGB -> preprocessing -> base (BatchNorm in inference
mode, but for a base trained from scratch) -> head``. By default it trains from cached activations
(components/activations.py): the frozen layers run once per photo and view
(the photo and its mirror), and each epoch trains only the layers from the cut
up and the head, on those activations mixed up in pairs (augment.mixup).
With image-space augmentation (augment.rotation, augment.zoom) or input noise,
every epoch runs on the decoded images instead. ``fine_tune.epochs: 0``
exports base + head unchanged; so does a run in which no epoch beat them on
val loss, and always a base.model of several bases (they stay frozen).

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

import csv
import difflib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from components import activations, base_models, devices, export, images, multi_worker, plots
from components import callbacks as callbacks_mod
from components.atomic import atomic_dir, read_json, write_csv, write_json
from components.fetch import sha256_of
from components.errors import GraftlineError
from components.vector_cache import VectorCache
from components.datasets import augmenter, image_dataset, split_batch_size
from components.head import HEAD_FILE, HEAD_HISTORY, HEAD_INFO
from components.recipe import (CURVE_COLUMNS, best_row, curve_row, early_stopping, keras_verbosity, make_optimizer,
                               rate_schedule, scheduled_rate)

# Test photos the TFLite models are compared with Keras on, one at a time: enough to catch a broken
# conversion. Each costs about 23 ms of Keras and 13 ms of TFLite (MobileNetV2 at 160 px, with the flip).
TFLITE_CHECK_MAX = 64
CHECKPOINT_STATE = "state.json"
BEST_WEIGHTS = "best.weights.npz"
SEED_STATES = "seed_states.npz"


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
    # BatchNorm stays in inference mode: in Keras 3, fit's training=True overrides the training=False
    # the base is called with (keras-team/keras#20285), and only a frozen BatchNormalization layer
    # keeps its moving statistics fixed. A base that exists as an architecture only (AlexNet, trained
    # from scratch) has no statistics to keep: its BatchNorm learns with the rest.
    for layer in base_models.all_layers(base) if base_models.has_pretrained_weights(b.model) else ():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    inputs = keras.Input((b.image_size, b.image_size, 3), name="image")
    model = keras.Model(inputs, head(extractor(inputs)), name="classifier")
    return model, base


def unfrozen_layers(params, base) -> int:
    """How many base layers fine_tune_at opened for training (their BatchNorm layers stay frozen)."""
    at = fine_tune_index(params, base)
    return 0 if at == -1 else max(0, len(base.layers) - at)


@dataclass
class Progress:
    """Where training stands after its last complete epoch: every epoch's curve row and Keras logs, early
    stopping's state, and whether it stopped; ``folder``: the checkpoint it was read from (None: a fresh start)."""
    rows: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    early_stopping: dict | None = None  # {"wait", "best", "best_epoch"}, restored into the callback on resume
    stopped: bool = False
    folder: Path | None = None

    def finished(self, epochs: int) -> bool:
        return self.stopped or len(self.rows) >= epochs

    def best_weights(self):
        """The best val-loss epoch's weights as early stopping kept them (None without early stopping)."""
        import numpy as np

        if not (self.folder and (self.folder / BEST_WEIGHTS).is_file()):
            return None
        with np.load(self.folder / BEST_WEIGHTS) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def checkpoint_callback(folder: Path, fingerprint: str, progress: Progress, first_epoch: int, stopper):
    """A Keras callback, after early stopping's (``stopper``, or None): after each epoch, save the model with
    its optimizer, the best epoch's weights and ``progress`` in one folder, atomically, then drop the older one."""
    import keras
    import numpy as np

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            progress.rows.append(curve_row(first_epoch + epoch, logs))
            progress.logs.append({name: float(value) for name, value in logs.items()})
            if stopper:
                progress.early_stopping = {"wait": stopper.wait, "best": float(stopper.best),
                                           "best_epoch": stopper.best_epoch}
                progress.stopped = bool(self.model.stop_training)
            name = f"epoch-{epoch + 1:04d}"
            with atomic_dir(folder / name) as tmp:
                self.model.save(tmp / export.MODEL_FILE)
                np.savez(tmp / SEED_STATES, **seed_states(self.model))
                if stopper:
                    np.savez(tmp / BEST_WEIGHTS, *stopper.best_weights)
                write_json(tmp / CHECKPOINT_STATE, {"fingerprint": fingerprint, "epochs_done": epoch + 1,
                                                    "rows": progress.rows, "logs": progress.logs,
                                                    "early_stopping": progress.early_stopping,
                                                    "stopped": progress.stopped})
            for old in folder.glob("epoch-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    return EpochCheckpoint()


def _seed_variables(model) -> dict:
    """"<layer>/<i>" -> the random-number state variables of each layer without sublayers (Dropout's)."""
    return {f"{layer.name}/{i}": v for layer in base_models.all_layers(model) if not hasattr(layer, "layers")
            for i, v in enumerate(v for v in layer.non_trainable_variables if v.name == "seed_generator_state")}


def seed_states(model) -> dict:
    """The layers' random-number states, which a .keras file does not keep: saved beside it, so that a resumed
    run draws the same dropout masks as one that ran through."""
    return {key: v.numpy() for key, v in _seed_variables(model).items()}


def load_checkpoint_model(folder: Path):
    """The model of a checkpoint, with its optimizer state and its layers' random-number states."""
    import keras
    import numpy as np

    model = keras.saving.load_model(folder / export.MODEL_FILE)
    with np.load(folder / SEED_STATES) as saved:
        for key, variable in _seed_variables(model).items():
            variable.assign(saved[key])
    return model


def run_fingerprint(params, head_dir: Path, examples: Path) -> str:
    """What a checkpoint must match to be resumed: the stage's params, the head, the photos' shards."""
    relevant = {k: params.to_dict()[k] for k in ("seed", "fine_tune_at", "base", "input_block", "augment",
                                                  "fine_tune")}
    relevant["train"] = {k: getattr(params.train, k) for k in ("device", "mixed_precision", "strategy")}
    shards = sorted((p.name, p.stat().st_size) for p in Path(examples).glob("*.tfrecord.gz"))
    blob = json.dumps([relevant, sha256_of(head_dir / HEAD_FILE), shards], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def last_checkpoint(folder: Path, fingerprint: str) -> Progress:
    """The newest complete epoch folder written for this fingerprint, as Progress (an empty one if none)."""
    for candidate in sorted(Path(folder).glob("epoch-*"), reverse=True):
        try:
            state = read_json(candidate / CHECKPOINT_STATE)
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") == fingerprint and (candidate / export.MODEL_FILE).is_file() \
                and (candidate / SEED_STATES).is_file():
            return Progress(state["rows"], state["logs"], state["early_stopping"], state["stopped"], candidate)
    return Progress()


def check_images(examples: Path, image_size: int, limit: int):
    """Up to ``limit`` decoded test photos, for checking the TFLite exports against Keras."""
    import numpy as np

    batches = [x.numpy() for x, _ in image_dataset(examples, "test", image_size, 64).take(-(-limit // 64))]
    return np.concatenate(batches)[:limit] if batches else None


def head_rows(head_dir: Path) -> list[dict]:
    """train_head's learning curve, one dict per epoch (recipe.CURVE_COLUMNS, as text)."""
    with open(head_dir / HEAD_HISTORY, newline="") as handle:
        return list(csv.DictReader(handle))


def joined_curve(head_dir: Path, fine_rows: list) -> list[dict]:
    return head_rows(head_dir) + [dict(zip(CURVE_COLUMNS, row)) for row in fine_rows]


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


@dataclass
class Run:
    """What the steps of one fine-tune share: its inputs read and checked, and where training stands."""
    labels: list
    head_dir: Path
    examples: Path
    first_epoch: int  # the first fine-tune epoch's number: the curves go on from the head's
    placement: dict
    batch_size: dict
    fingerprint: str
    progress: Progress
    resumed_after: int


@dataclass
class Trained:
    """The model that is exported, its base, and the figures of the epoch whose weights it holds."""
    model: object
    base: object
    final: dict  # accuracy, loss, val_accuracy, val_loss
    best_epoch: int | None = None  # None: no epoch trained, or none beat base + head as train-head left them
    report: dict = field(default_factory=dict)


def train_and_save(params, inputs: dict, outputs: dict, strategy) -> dict:
    """run's work in the given strategy; checkpoints are read from inputs and written to outputs["checkpoints"]."""
    started = time.time()
    state = prepare(params, inputs, strategy)
    trained = train(params, state, training_callbacks(params, outputs, state), strategy)
    trained_at = time.time()
    metrics, report = save(params, state, trained, outputs)
    report.update(wall_time_s=round(time.time() - started, 2), train_s=round(trained_at - started, 2),
                  export_s=round(time.time() - trained_at, 2))
    write_json(Path(outputs["report"]), report)
    shutil.rmtree(outputs["checkpoints"], ignore_errors=True)  # done: nothing left to resume
    return {**metrics, **report}


def prepare(params, inputs: dict, strategy) -> Run:
    """The inputs read and checked, batch sizes for this placement, and where a killed run left off."""
    labels = read_json(Path(inputs["labels"]))
    head_dir, examples = Path(inputs["head"]), Path(inputs["examples"])
    head_info = read_json(head_dir / HEAD_INFO)
    if head_info["labels"] != labels:
        raise GraftlineError(f"{head_dir} was trained on classes {head_info['labels']}, not {labels}; re-run train_head")
    placement = devices.placement(strategy, params.fine_tune.batch_size)
    batch_size = {split: split_batch_size(examples, split, placement) for split in ("train", "val")}
    fingerprint = run_fingerprint(params, head_dir, examples)
    progress = resume_point(params, Path(inputs["checkpoints"]), fingerprint, strategy)
    return Run(labels, head_dir, examples, head_info["epochs_run"] + 1, placement, batch_size, fingerprint, progress,
               len(progress.rows))


def training_callbacks(params, outputs: dict, state: Run) -> list:
    """TensorBoard's; and while epochs remain, the schedule, early stopping (resumed) and the epoch checkpoint."""
    f, progress = params.fine_tune, state.progress
    callbacks = callbacks_mod.tensorboard(outputs, resumed=bool(state.resumed_after))
    if progress.finished(f.epochs):
        return callbacks
    stoppers = early_stopping(f.early_stopping_patience, progress.early_stopping, progress.best_weights())
    checkpoint = checkpoint_callback(Path(outputs["checkpoints"]), state.fingerprint, progress, state.first_epoch,
                                     stoppers[0] if stoppers else None)
    # The schedule first: it puts each epoch's rate into the logs the others see; the checkpoint after early
    # stopping, whose state it saves.
    return rate_schedule(f.schedule, f.learning_rate, f.epochs) + callbacks + stoppers + [checkpoint]


def train(params, state: Run, callbacks: list, strategy) -> Trained:
    """From cached activations of the frozen part, or on the images every epoch; or, with no epochs, base + head
    as they are, scored."""
    if base_models.is_combined(params.base.model):  # frozen bases: the head on their features is the model
        model, base = build_classifier(params, load_head(state.head_dir))
        return Trained(model, base, head_figures(state.head_dir),
                       report={"trained_from": "nothing: several frozen bases, the head as train_head left it"})
    if params.fine_tune.epochs > 0 and uses_activations(params):
        return fit_on_activations(params, state, callbacks, strategy)
    if params.fine_tune.epochs > 0:
        return fit_on_images(params, state, callbacks, strategy)
    model, base = build_classifier(params, load_head(state.head_dir))
    return Trained(model, base, evaluate_as_is(model, state.examples, params.base.image_size, state.batch_size))


def save(params, state: Run, trained: Trained, outputs: dict) -> tuple[dict, dict]:
    """Export (with the test-time flip when augment.tta is on), curves, DVCLive's files, metrics; (metrics,
    the report so far)."""
    f, rows, size = params.fine_tune, state.progress.rows, params.base.image_size
    served = images.with_flip_averaged(trained.model) if params.augment.tta == "flip" else trained.model
    with atomic_dir(Path(outputs["model"])) as tmp:
        photos = check_images(state.examples, size, TFLITE_CHECK_MAX) if params.export.tflite else None
        exported = export.export(served, state.labels, size, tmp, photos, params.export.tflite)
    write_csv(Path(outputs["plots"]), CURVE_COLUMNS, rows)
    plots.learning_curves(joined_curve(state.head_dir, rows), state.first_epoch if rows else None,
                          Path(outputs["curves"]))
    callbacks_mod.write_live(outputs, state.progress.logs)
    metrics = fine_tune_metrics(params, trained, exported, len(rows))
    write_json(Path(outputs["metrics"]), metrics)
    report = {**state.placement, "batch_sizes": state.batch_size,
              "trained_from": "activations" if uses_activations(params) else "images", **trained.report,
              "base_layers": len(trained.base.layers), "trainable_weights": len(trained.model.trainable_weights),
              "resumed_after_epoch": state.resumed_after, "test_time_augmentation": params.augment.tta,
              "learning_rate": {"schedule": f.schedule, "per_epoch": [  # what rate_schedule set each epoch
                  float(f"{scheduled_rate(f.schedule, f.learning_rate, e, f.epochs):.9g}") for e in range(len(rows))]},
              "tflite": exported}
    return metrics, report


def resume_point(params, checkpoints: Path, fingerprint: str, strategy) -> Progress:
    """Where a killed run left off: the newest checkpoint of these params, head and photos (empty Progress: none).

    A non-chief worker reads the chief's checkpoints (shared storage) and writes its own to a temporary folder.
    """
    epochs = params.fine_tune.epochs
    progress = last_checkpoint(checkpoints, fingerprint) if epochs > 0 else Progress()
    if not multi_worker.same_on_every_worker(strategy, len(progress.rows)):
        # Workers must build the same variables and run the same epochs, or the collectives hang.
        print(f"fine-tune: starting over on every worker: they found different checkpoints (this one: "
              f"{progress.folder or 'none'}); to resume, keep the checkpoints folder on storage every worker reads")
        return Progress()
    if progress.folder:
        print(f"fine-tune: resuming after epoch {len(progress.rows)} of {epochs} from {progress.folder}")
    return progress


def load_head(head_dir: Path):
    import keras

    return keras.saving.load_model(head_dir / HEAD_FILE)


def chosen_epoch(params, progress: Progress) -> tuple[dict, int]:
    """The figures and number of the epoch whose weights are kept: the best val loss of all epochs run, this
    run's and a killed run's alike (early stopping restores it), or the last without early stopping."""
    chosen = best_row(progress.rows, params.fine_tune.early_stopping_patience)
    return dict(zip(CURVE_COLUMNS[1:], chosen[1:])), chosen[0]


def head_figures(head_dir: Path) -> dict:
    """train_head's figures of the epoch it kept: the same model on the same features as base + head."""
    best = read_json(head_dir / HEAD_INFO)["best_epoch"]
    row = next(r for r in head_rows(head_dir) if int(r["epoch"]) == best)
    return {k: float(row[k]) for k in CURVE_COLUMNS[1:]}


def evaluate_as_is(model, examples: Path, size: int, batch_size: dict) -> dict:
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    figures = {}
    for split, prefix in (("train", ""), ("val", "val_")):
        loss, accuracy = model.evaluate(image_dataset(examples, split, size, batch_size[split]), verbose=0)
        figures.update({f"{prefix}accuracy": accuracy, f"{prefix}loss": loss})
    return figures


def fine_tune_metrics(params, trained: Trained, exported: dict, epochs_run: int) -> dict:
    import keras

    base = trained.base
    n_open = unfrozen_layers(params, base)
    opened = base.layers[len(base.layers) - n_open:] if n_open else []
    metrics = {k: round(float(v), 6) for k, v in trained.final.items()}
    metrics.update({"epochs": params.fine_tune.epochs, "epochs_run": epochs_run,
                    "best_epoch": trained.best_epoch, "fine_tune_at": params.fine_tune_at,
                    "trainable_base_layers": len(opened),
                    "frozen_batchnorm_layers": sum(isinstance(l, keras.layers.BatchNormalization) and not l.trainable
                                                   for l in opened)})
    metrics.update({f"tflite_{kind}_top1_agreement": e["top1_agreement"]
                    for kind, e in exported.items() if "top1_agreement" in e})
    return metrics


def fit_on_images(params, state: Run, callbacks: list, strategy) -> Trained:
    """Fine-tune on the decoded images every epoch (image-space augmentation or input noise is on)."""
    f, size, progress = params.fine_tune, params.base.image_size, state.progress
    # Every variable is made in the strategy's scope, so it is mirrored on each GPU.
    with strategy.scope():
        if progress.folder:  # weights and optimizer state as the last complete epoch left them
            model = load_checkpoint_model(progress.folder)
            base = base_models.base_of(model.get_layer("feature_extractor"))
        else:
            model, base = build_classifier(params, load_head(state.head_dir))
            model.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if not progress.finished(f.epochs):
        train = image_dataset(state.examples, "train", size, state.batch_size["train"], shuffle_seed=params.seed,
                              augment=augmenter(params))
        val = image_dataset(state.examples, "val", size, state.batch_size["val"])
        model.fit(train, validation_data=val, epochs=f.epochs, initial_epoch=len(progress.rows),
                  shuffle=False, callbacks=callbacks, verbose=keras_verbosity())  # shuffled above, by seed
    elif progress.best_weights() is not None:  # finished before a kill: early stopping's choice, as it restored it
        model.set_weights(progress.best_weights())
    return Trained(model, base, *chosen_epoch(params, progress))


def fit_on_activations(params, state: Run, callbacks: list, strategy) -> Trained:
    """Fine-tune from cached activations of the frozen part: it runs once per photo and view (cached across
    runs), then every epoch trains only the layers from the cut up, and the head, on those activations."""
    import keras

    f, progress, classes = params.fine_tune, state.progress, len(state.labels)
    with strategy.scope():
        classifier, base = build_classifier(params, load_head(state.head_dir))
    front, top, cut = activations.split(classifier.get_layer("feature_extractor"), fine_tune_index(params, base))
    (acts, labels_train), (val_acts, labels_val), report = activations_of(params, front, base.layers[cut - 1].name,
                                                                          cut, state.examples)
    start_model, trained = top_models(params, classifier, top, acts.shape[2:], progress, strategy)
    val = (val_acts[:, 0].astype("float32"), keras.utils.to_categorical(labels_val, classes))
    start = dict(zip(("val_loss", "val_accuracy"), start_model.evaluate(*val, batch_size=state.batch_size["val"],
                                                                        verbose=0)))
    start_weights = start_model.get_weights()
    if not progress.finished(f.epochs):
        train = activations.batches(acts, labels_train, classes, state.batch_size["train"], params.seed,
                                    params.augment.mixup)
        trained.fit(train.from_epoch(len(progress.rows)), steps_per_epoch=len(train), validation_data=val,
                    validation_batch_size=state.batch_size["val"], epochs=f.epochs, initial_epoch=len(progress.rows),
                    callbacks=callbacks, verbose=keras_verbosity())
    elif progress.best_weights() is not None:  # finished before a kill: early stopping's choice, as it restored it
        trained.set_weights(progress.best_weights())
    # Early stopping keeps the best epoch; on a small folder that can still be worse than base + head as they
    # came from train-head (mixup's first epochs disturb the head): then they are kept as they were.
    if f.early_stopping_patience and min(row[CURVE_COLUMNS.index("val_loss")] for row in progress.rows) >= \
            start["val_loss"]:
        start_model.set_weights(start_weights)
        identity = (acts[:, 0].astype("float32"), keras.utils.to_categorical(labels_train, classes))
        start.update(zip(("loss", "accuracy"), start_model.evaluate(*identity, batch_size=state.batch_size["train"],
                                                                    verbose=0)))
        return Trained(classifier, base, start, None, {**report, "kept_base_and_head": start})
    activations.copy_weights(trained, classifier)  # a no-op unless resumed: the layers are shared otherwise
    return Trained(classifier, base, *chosen_epoch(params, progress), report)


def top_models(params, classifier, top, activation_shape, progress: Progress, strategy):
    """(start, trained): the layers from the cut up and the head as train-head left them (sharing the classifier's
    layers, so training it trains what is exported), and the model training goes on with: that same one, or a
    killed run's last checkpoint."""
    import keras

    f = params.fine_tune
    with strategy.scope():
        inputs = keras.Input(activation_shape, name="activation")
        start = keras.Model(inputs, classifier.get_layer("head")(top(inputs, training=False)), name="top")
        start.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        return start, load_checkpoint_model(progress.folder) if progress.folder else start


def activations_of(params, front, cut_layer: str, cut: int, examples: Path):
    """(train activations and labels, val activations and labels, what the report says of them)."""
    f, size = params.fine_tune, params.base.image_size
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
    return (acts, labels_train), (val_acts, labels_val), report


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

"""Stage 4, fine-tune: the backbone + the trained head, every base's layers from ``fine_tune_at`` up trainable.

The full model is ``[0, 255] RGB -> per base: preprocessing -> base (BatchNorm in
inference mode, but for a base trained from scratch) -> features side by side -> head``
(components/backbone.py). By default it trains from cached activations
(components/activations.py): each base's frozen layers run once per photo and view
(the photo and its mirror), and each epoch trains only the layers from the cuts
up and the head, on those activations mixed up in pairs (augment.mixup).
With image-space augmentation (augment.rotation, augment.zoom) or input noise,
every epoch runs on the decoded images instead. ``fine_tune_at: -1`` (the bases
frozen) and ``fine_tune.epochs: 0`` export the backbone + head as train_head left
them, with train_head's figures; so does a run in which no epoch beat them on val loss.

Every epoch is checkpointed (model, optimizer state, curve so far) under
``inputs["checkpoints"]``; a run that was killed resumes from its last
complete epoch when run again with the same params, head and photos.

Outputs: ``model`` (components/export.py: .keras, SavedModel taking image
bytes, TFLite float and dynamic-range with their top-1 agreement, labels; with
augment.tta: flip, every form averages over the photo and its mirror),
``metrics``, ``plots`` (epochs numbered after the head's so the curves join),
``curves`` (PNG of head and fine-tune curves with a "start fine-tuning"
marker), ``report`` (wall time and its phases, how it trained, each base's cut and
cache and the layers it opened; devices, strategy and dtype policy from components.devices).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from components import activations, base_models, devices, export, images, multi_worker, plots
from components.backbone import FROZEN, Backbone
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
# Part of a checkpoint's fingerprint: bump it when what a checkpoint holds changes shape (2: the top model takes
# one activation per base).
CHECKPOINT_FORMAT = 2


def build_classifier(params, backbone: Backbone, head):
    """The backbone's feature extractor + head as one model, every base open from fine_tune_at up; returns
    (model, what each base opened: Backbone.opening)."""
    import keras

    extractor = backbone.extractor()
    opened = backbone.open_from(extractor, params.fine_tune_at)
    inputs = keras.Input(extractor.input_shape[1:], name="image")
    return keras.Model(inputs, head(extractor(inputs)), name="classifier"), opened


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
    relevant["checkpoint_format"] = CHECKPOINT_FORMAT
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
    return (params.fine_tune_at != FROZEN and not params.augment.rotation and not params.augment.zoom
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
    backbone: Backbone


@dataclass
class Trained:
    """The model that is exported, what each base opened, and the figures of the epoch whose weights it holds."""
    model: object
    opened: list  # Backbone.opening
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
               len(progress.rows), Backbone.from_params(params))


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
    """From cached activations of the frozen part, or on the images every epoch; or, with nothing to train (the
    bases frozen, or no epochs), the backbone + head as train_head left them, with its figures."""
    if params.fine_tune_at == FROZEN or params.fine_tune.epochs == 0:
        model, opened = build_classifier(params, state.backbone, load_head(state.head_dir))
        return Trained(model, opened, head_figures(state.head_dir),
                       report={"trained_from": "nothing: the head as train_head left it, on the backbone as it came"})
    if uses_activations(params):
        return fit_on_activations(params, state, callbacks, strategy)
    return fit_on_images(params, state, callbacks, strategy)


def save(params, state: Run, trained: Trained, outputs: dict) -> tuple[dict, dict]:
    """Export (with the test-time flip when augment.tta is on), curves, DVCLive's files, metrics; (metrics,
    the report so far)."""
    f, rows, size = params.fine_tune, state.progress.rows, params.base.image_size
    served = images.with_flip_averaged(trained.model) if params.augment.tta == "flip" else trained.model
    with atomic_dir(Path(outputs["model"])) as tmp:
        photos = check_images(state.examples, size, TFLITE_CHECK_MAX) if params.export.tflite else None
        exported = export.export(served, state.labels, size, tmp, photos, params.export.tflite, params.data.max_pixels)
    write_csv(Path(outputs["plots"]), CURVE_COLUMNS, rows)
    plots.learning_curves(joined_curve(state.head_dir, rows), state.first_epoch if rows else None,
                          Path(outputs["curves"]))
    callbacks_mod.write_live(outputs, state.progress.logs)
    metrics = fine_tune_metrics(params, trained, exported, len(rows))
    write_json(Path(outputs["metrics"]), metrics)
    report = {**state.placement, "batch_sizes": state.batch_size,
              "trained_from": "activations" if uses_activations(params) else "images", **trained.report,
              "bases": trained.opened, "trainable_weights": len(trained.model.trainable_weights),
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


def fine_tune_metrics(params, trained: Trained, exported: dict, epochs_run: int) -> dict:
    metrics = {k: round(float(v), 6) for k, v in trained.final.items()}
    metrics.update({"epochs": params.fine_tune.epochs, "epochs_run": epochs_run,
                    "best_epoch": trained.best_epoch, "fine_tune_at": params.fine_tune_at,
                    "trainable_base_layers": sum(base["trainable_layers"] for base in trained.opened),
                    "frozen_batchnorm_layers": sum(base["frozen_batchnorm_layers"] for base in trained.opened),
                    "trainable_layers_per_base": {base["model"]: base["trainable_layers"] for base in trained.opened}})
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
            opened = state.backbone.opening(model, params.fine_tune_at)
        else:
            model, opened = build_classifier(params, state.backbone, load_head(state.head_dir))
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
    return Trained(model, opened, *chosen_epoch(params, progress))


def fit_on_activations(params, state: Run, callbacks: list, strategy) -> Trained:
    """Fine-tune from cached activations of each base's frozen part: it runs once per photo and view (cached
    across runs), then every epoch trains only the layers from the cuts up, and the head, on those activations."""
    import keras

    f, progress, classes = params.fine_tune, state.progress, len(state.labels)
    with strategy.scope():
        classifier, opened = build_classifier(params, state.backbone, load_head(state.head_dir))
    front, top, cuts = activations.split(state.backbone, classifier.get_layer("feature_extractor"),
                                         params.fine_tune_at)
    (acts, labels_train), (val_acts, labels_val), report = activations_of(params, state, front, cuts)
    start_model, trained = top_models(params, classifier, top, progress, strategy)
    val = ([a[:, 0].astype("float32") for a in val_acts], keras.utils.to_categorical(labels_val, classes))
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
        identity = ([a[:, 0].astype("float32") for a in acts], keras.utils.to_categorical(labels_train, classes))
        start.update(zip(("loss", "accuracy"), start_model.evaluate(*identity, batch_size=state.batch_size["train"],
                                                                    verbose=0)))
        return Trained(classifier, opened, start, None, {**report, "kept_base_and_head": start})
    if trained is not start_model:  # resumed: the checkpoint's model trained, not the one sharing the classifier's
        start_model.set_weights(trained.get_weights())  # layers; the same architecture, so the same weight order
    return Trained(classifier, opened, *chosen_epoch(params, progress), report)


def top_models(params, classifier, top, progress: Progress, strategy):
    """(start, trained): the layers from the cuts up and the head as train-head left them (sharing the
    classifier's layers, so training it trains what is exported), and the model training goes on with: that same
    one, or a killed run's last checkpoint."""
    import keras

    f = params.fine_tune
    with strategy.scope():
        inputs = [keras.Input(tensor.shape[1:], name=tensor.name) for tensor in top.inputs]
        start = keras.Model(inputs, classifier.get_layer("head")(top(inputs, training=False)), name="top_and_head")
        start.compile(optimizer=make_optimizer(f.optimizer, f.learning_rate), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        return start, load_checkpoint_model(progress.folder) if progress.folder else start


def activations_of(params, state: Run, front, cuts: list[activations.Cut]):
    """(train activations and labels, val activations and labels, what the report says of them)."""
    f, size = params.fine_tune, params.base.image_size
    views = activations.views_for(params.augment)
    caches = activation_caches(params, state.backbone, front, [cut.layer for cut in cuts], views)
    computing = time.time()
    acts, labels_train, computed_train = activations.compute(front, state.examples, "train", views, size, caches,
                                                              f.batch_size)
    val_acts, labels_val, computed_val = activations.compute(front, state.examples, "val", views[:1], size, caches,
                                                             f.batch_size)
    bases = [{"model": base.name, "cut_before_layer": cut.index, "cut_layer": cut.layer, "shape": list(a.shape[2:]),
              "cache": cache[views[0]].folder if cache else None}
             for base, cut, a, cache in zip(state.backbone.bases, cuts, acts, caches or [{}] * len(cuts))]
    report = {"activations": {"bases": bases, "views": list(views), "computed": computed_train + computed_val,
                              "read_from_cache": int(len(labels_train) * len(views) + len(labels_val)
                                                     - computed_train - computed_val),
                              "megabytes": round(sum(a.nbytes for a in acts + val_acts) / 1e6, 1)},
              "activations_s": round(time.time() - computing, 2), "mixup": params.augment.mixup}
    return (acts, labels_train), (val_acts, labels_val), report


def activation_caches(params, backbone: Backbone, front, cut_layers: list[str], views) -> list[dict]:
    """Per base, view -> VectorCache of its activations at its cut (under bottleneck.cache_dir); [] when off."""
    if not params.bottleneck.cache_dir or not backbone.cacheable:  # random weights differ with the seed
        return []
    return [{view: VectorCache(params.bottleneck.cache_dir, activations.fingerprint(fingerprint, layer, view), shape,
                               activations.STORED_DTYPE, "f16") for view in views}
            for fingerprint, layer, shape in zip(backbone.base_fingerprints(), cut_layers, activations.shapes(front))]

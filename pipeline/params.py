"""Typed params: the only place that knows defaults and constraints.

``load(path)`` reads params.yaml, rejects unknown keys (``dvc exp run -S``
accepts misspellings silently, so this is where they are caught), fills
defaults and checks every value before any stage does work. Errors name the
key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import GraftlineError
from components.fetch import DOWNLOAD_DIR

FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

OPTIMIZERS = ("adam", "rmsprop", "sgd")
# Metrics of metrics/evaluate.json that evaluate.thresholds may gate on.
GATED_METRICS = ("accuracy", "macro_f1")


class ParamsError(GraftlineError):
    pass


@dataclass(frozen=True)
class DataParams:
    # A folder of class folders, or a .tgz/.tar.gz/.zip archive (a local path; DVC tracks its contents).
    source: str = f"{DOWNLOAD_DIR}/flower_photos.tgz"
    # Downloaded once to data.source when data.source lies in data/download/ ('' = nothing to download).
    url: str = FLOWERS_URL
    # sha256 of an archive source ("" = not checked); ignored for folders.
    sha256: str = FLOWERS_SHA256
    val_percent: float = 15.0
    test_percent: float = 15.0
    # Changing the salt reshuffles every photo's split; keep it fixed.
    split_salt: str = ""
    shard_size: int = 1000
    min_per_class: int = 2
    # Processes that check photos in parallel; 0 = one per core.
    workers: int = 0
    # The same photo under two classes: drop (keep no copy) | keep_first (the first path's class).
    label_conflicts: str = "drop"


@dataclass(frozen=True)
class BaseParams:
    model: str = "mobilenet_v2"
    alpha: float = 1.0
    image_size: int = 160
    # "imagenet" (Keras' file in $KERAS_HOME/models, downloaded once), "none"
    # (random weights, asked for explicitly) or a path to a weights file.
    weights: str = "imagenet"
    # For base.model keras:<path>: the layer whose output is the bottleneck ('' = the one before the last).
    feature_layer: str = ""


@dataclass(frozen=True)
class InputBlockParams:
    """In front of the base (the CIFAR recipe): noise only in training; upsampling always."""
    noise: float = 0.0  # GaussianNoise stddev, in the base's input scale
    upsample: int = 1  # the base sees image_size x upsample pixels


@dataclass(frozen=True)
class BottleneckParams:
    # DirectRunner, dask (Beam's DaskRunner on a Dask cluster), or any Beam runner name
    # (FlinkRunner, SparkRunner, DataflowRunner) with its flags in beam_options.
    runner: str = "DirectRunner"
    # Free-form Beam flags, e.g. ["--direct_running_mode=multi_processing", "--direct_num_workers=2"].
    beam_options: tuple[str, ...] = ()
    batch_size: int = 32
    # DirectRunner processes: 1 = in-memory (fastest on 2 cores, see README), N > 1 = multi-processing.
    # runner dask without dask_address: the local cluster's worker processes.
    workers: int = 1
    # runner dask: an existing scheduler, e.g. tcp://scheduler:8786 ('' = start a local cluster).
    dask_address: str = ""
    # Per-image feature cache ('' = off): a re-run computes only new photos. Any Beam filesystem path.
    cache_dir: str = "data/feature_cache"


@dataclass(frozen=True)
class TrainHeadParams:
    # Epochs on cached features cost milliseconds, so the head trains until
    # val loss stops improving (patience) and keeps the best epoch's weights.
    epochs: int = 200
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    dropout: float = 0.2
    batch_size: int = 32
    early_stopping_patience: int = 10
    hidden_units: int = 0  # > 0 adds a ReLU hidden layer (with its own dropout) to the head
    class_weights: str = "none"  # none | auto (balance classes of unequal size in the loss)


@dataclass(frozen=True)
class AugmentParams:
    # Training photos mirrored left to right: a cached view when fine-tuning from activations,
    # a RandomFlip layer when fine-tuning on the images.
    flip: bool = True
    # Image-space rotation and zoom (fractions): with either on, fine-tune runs on the images every epoch.
    rotation: float = 0.0
    zoom: float = 0.0
    # Mixup of cached activations, weights ~ Beta(mixup, mixup) (0 = off); fine-tuning from activations only.
    mixup: float = 0.4
    # Test-time augmentation in the exported model (evaluate, predict, serving, TFLite): flip | none.
    tta: str = "flip"


@dataclass(frozen=True)
class FineTuneParams:
    # From cached activations an epoch runs only the layers from the cut up: Adam at 1e-4 with
    # mixup converges in a few epochs (README, "Why this fine-tune recipe").
    epochs: int = 6
    learning_rate: float = 1e-4
    optimizer: str = "adam"
    batch_size: int = 32
    # Stop when val loss has not improved for this many epochs and keep the best
    # epoch's weights (0 = train all epochs): on small folders fine-tuning overfits.
    early_stopping_patience: int = 2


@dataclass(frozen=True)
class EvaluateParams:
    top_k: int = 3  # top_k_accuracy: the true class among the k most probable
    mistakes: int = 20  # the most confident wrong predictions listed in metrics
    # Gate: metric name -> minimum, e.g. {accuracy: 0.9}; the stage exits non-zero below it.
    thresholds: dict[str, float] = field(default_factory=dict)
    # CI gate: largest accepted drop of test accuracy against the main branch's.
    max_drop: float = 0.02


@dataclass(frozen=True)
class TrainParams:
    """Where train-head and fine-tune run (ingest, bottleneck and evaluate ignore it)."""
    device: str = "auto"  # auto (GPU when TensorFlow sees one) | cpu | gpu
    mixed_precision: str = "auto"  # auto (on for GPU) | on | off
    # auto: mirrored when several devices are visible, else one device. multi_worker:
    # MultiWorkerMirroredStrategy across the machines named in TF_CONFIG (one process each).
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker
    # Compiled TFX pipelines (Vertex / Kubeflow): what the training components request.
    accelerator: str = "NVIDIA_TESLA_T4"
    accelerator_count: int = 1


@dataclass(frozen=True)
class ExportParams:
    # TFLite files fine-tune writes into artifacts/model and checks against Keras on the test photos:
    # float, dynamic_range ([] = none; each conversion of MobileNetV2 takes seconds).
    tflite: tuple[str, ...] = ("float", "dynamic_range")


@dataclass(frozen=True)
class TfxParams:
    # Container image every compiled TFX component runs in (holds graftline and its venv).
    image: str = "ghcr.io/graftline/graftline:latest"


@dataclass(frozen=True)
class Params:
    seed: int = 42
    # Base layers with index >= fine_tune_at are trained in fine-tune; -1 freezes all.
    fine_tune_at: int = 100
    data: DataParams = field(default_factory=DataParams)
    base: BaseParams = field(default_factory=BaseParams)
    input_block: InputBlockParams = field(default_factory=InputBlockParams)
    bottleneck: BottleneckParams = field(default_factory=BottleneckParams)
    train_head: TrainHeadParams = field(default_factory=TrainHeadParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    fine_tune: FineTuneParams = field(default_factory=FineTuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    train: TrainParams = field(default_factory=TrainParams)
    export: ExportParams = field(default_factory=ExportParams)
    tfx: TfxParams = field(default_factory=TfxParams)

    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamsError(f"params: {key} = {value!r} is not allowed; expected {allowed}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one leaf's type; ints are accepted where floats are expected."""
    if kind is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    if kind == dict[str, float]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
        ):
            _fail(key, value, "a mapping of metric names to numbers, e.g. {accuracy: 0.9}")
        return {k: float(v) for k, v in value.items()}
    if kind == tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(key, value, "a list of strings")
        return tuple(value)
    raise AssertionError(f"unhandled param type {kind} for {key}")


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(prefix or "params.yaml", raw, "a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ParamsError(
            f"params: unknown key '{prefix}{key}'.{hint} Known keys here: {', '.join(fields)}."
        )
    values = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in raw.items():
        kind = _SECTIONS.get(name) if cls is Params else None
        if kind is not None:
            values[name] = _build(kind, value, f"{name}.")
        else:
            values[name] = _coerce(prefix + name, value, _TYPES[hints[name]])
    return cls(**values)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple[str, ...],
          "dict[str, float]": dict[str, float]}
_SECTIONS = {
    "data": DataParams,
    "base": BaseParams,
    "input_block": InputBlockParams,
    "bottleneck": BottleneckParams,
    "train_head": TrainHeadParams,
    "augment": AugmentParams,
    "fine_tune": FineTuneParams,
    "evaluate": EvaluateParams,
    "train": TrainParams,
    "export": ExportParams,
    "tfx": TfxParams,
}


STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def _validate(p: Params) -> None:
    from components import base_models  # the registry knows model names

    d = p.data
    if not d.source:
        _fail("data.source", d.source, "a folder of class folders or an archive path")
    if "://" in d.source:
        name = d.source.rstrip("/").rsplit("/", 1)[-1] or "photos.tgz"
        _fail("data.source", d.source, f"a local path, which DVC can track: put the URL in data.url and set "
                                       f"data.source: {DOWNLOAD_DIR}/{name} (the download stage saves it there)")
    if d.source.startswith("~"):
        _fail("data.source", d.source, "a path without ~ (DVC does not expand it): write the absolute path")
    if d.url and not d.url.startswith(("http://", "https://")):
        _fail("data.url", d.url, "an http(s) URL, or '' when data.source is a folder or archive of your own")
    if not 0 < d.val_percent < 100:
        _fail("data.val_percent", d.val_percent, "a percentage > 0 and < 100 (val loss drives early stopping)")
    if not 0 < d.test_percent < 100:
        _fail("data.test_percent", d.test_percent, "a percentage > 0 and < 100")
    if d.val_percent + d.test_percent >= 100:
        _fail("data.val_percent + data.test_percent", d.val_percent + d.test_percent, "less than 100, to leave photos to train on")
    if d.sha256 and (len(d.sha256) != 64 or any(c not in "0123456789abcdef" for c in d.sha256)):
        _fail("data.sha256", d.sha256, "64 lowercase hex digits, or '' to skip the check")
    if d.shard_size < 1:
        _fail("data.shard_size", d.shard_size, "an integer >= 1")
    if d.min_per_class < 1:
        _fail("data.min_per_class", d.min_per_class, "an integer >= 1")
    if d.workers < 0:
        _fail("data.workers", d.workers, "an integer >= 0 (0 = one per core)")
    if d.label_conflicts not in ("drop", "keep_first"):
        _fail("data.label_conflicts", d.label_conflicts, "drop or keep_first")

    b = p.base
    if base_models.is_keras_file(b.model):
        if b.image_size < 8:
            _fail("base.image_size", b.image_size, "an integer >= 8, the input size of the keras: model")
    elif b.model not in base_models.REGISTRY:
        _fail("base.model", b.model, f"one of {', '.join(sorted(base_models.REGISTRY))}, or keras:<path to a .keras model>")
    else:
        for key, value, allowed in base_models.REGISTRY[b.model].problems(b.alpha, b.image_size * p.input_block.upsample):
            _fail(key, value, allowed)
        if b.feature_layer:
            _fail("base.feature_layer", b.feature_layer, f"'' for {b.model} (it applies to keras:<path> bases)")
    if not b.weights:
        _fail("base.weights", b.weights, "'imagenet', 'none' or a path to a weights file")

    if p.bottleneck.workers < 1:
        _fail("bottleneck.workers", p.bottleneck.workers, "an integer >= 1")
    if not 0 <= p.input_block.noise <= 1:
        _fail("input_block.noise", p.input_block.noise, "a standard deviation from 0 (no noise) to 1")
    if not 1 <= p.input_block.upsample <= 8:
        _fail("input_block.upsample", p.input_block.upsample, "an integer factor from 1 (none) to 8")
    if not p.bottleneck.runner:
        _fail("bottleneck.runner", p.bottleneck.runner, "a Beam runner name such as DirectRunner, or dask")
    if p.bottleneck.dask_address:
        from components.beam_runners import is_dask

        if not is_dask(p.bottleneck.runner):
            _fail("bottleneck.dask_address", p.bottleneck.dask_address, "'' unless bottleneck.runner is dask")
    if p.train.strategy not in STRATEGIES:
        _fail("train.strategy", p.train.strategy, " | ".join(STRATEGIES))
    for section in ("bottleneck", "train_head", "fine_tune"):
        size = getattr(p, section).batch_size
        if size < 1:
            _fail(f"{section}.batch_size", size, "an integer >= 1")

    for section in ("train_head", "fine_tune"):
        s = getattr(p, section)
        minimum = 1 if section == "train_head" else 0
        if s.epochs < minimum:
            _fail(f"{section}.epochs", s.epochs, f"an integer >= {minimum}")
        if not 0 < s.learning_rate < 1:
            _fail(f"{section}.learning_rate", s.learning_rate, "a number > 0 and < 1")
        if s.optimizer not in OPTIMIZERS:
            _fail(f"{section}.optimizer", s.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    if p.fine_tune.early_stopping_patience < 0:
        _fail("fine_tune.early_stopping_patience", p.fine_tune.early_stopping_patience, "an integer >= 0 (0 = off)")
    if not 0 <= p.train_head.dropout < 1:
        _fail("train_head.dropout", p.train_head.dropout, "a number >= 0 and < 1")
    if p.train_head.hidden_units < 0:
        _fail("train_head.hidden_units", p.train_head.hidden_units, "an integer >= 0 (0 = no hidden layer)")
    if p.train_head.class_weights not in ("none", "auto"):
        _fail("train_head.class_weights", p.train_head.class_weights, "none or auto")
    if p.train_head.early_stopping_patience < 0:
        _fail("train_head.early_stopping_patience", p.train_head.early_stopping_patience, "an integer >= 0 (0 turns early stopping off)")

    if p.fine_tune_at < -1:
        _fail("fine_tune_at", p.fine_tune_at, "-1 (freeze the whole base) or a layer index >= 0")
    if not 0 <= p.augment.rotation <= 1:
        _fail("augment.rotation", p.augment.rotation, "a fraction of a full turn between 0 and 1")
    if not 0 <= p.augment.zoom < 1:
        _fail("augment.zoom", p.augment.zoom, "a fraction >= 0 and < 1")
    if not 0 <= p.augment.mixup <= 10:
        _fail("augment.mixup", p.augment.mixup, "a Beta parameter from 0 (off) to 10; 0.2 to 0.4 is usual")
    if p.augment.tta not in ("flip", "none"):
        _fail("augment.tta", p.augment.tta, "flip or none")

    if p.train.device not in ("auto", "cpu", "gpu"):
        _fail("train.device", p.train.device, "auto, cpu or gpu")
    if p.train.mixed_precision not in ("auto", "on", "off"):
        _fail("train.mixed_precision", p.train.mixed_precision, "auto, on or off")
    if p.train.accelerator_count < 1:
        _fail("train.accelerator_count", p.train.accelerator_count, "an integer >= 1")
    for kind in p.export.tflite:
        if kind not in ("float", "dynamic_range"):
            _fail("export.tflite", list(p.export.tflite), "a list of float and/or dynamic_range, or [] for no TFLite")
    if not p.tfx.image:
        _fail("tfx.image", p.tfx.image, "a container image reference")
    if p.evaluate.top_k < 1:
        _fail("evaluate.top_k", p.evaluate.top_k, "an integer >= 1")
    if p.evaluate.mistakes < 0:
        _fail("evaluate.mistakes", p.evaluate.mistakes, "an integer >= 0")
    if not 0 <= p.evaluate.max_drop <= 1:
        _fail("evaluate.max_drop", p.evaluate.max_drop, "a fraction between 0 and 1")
    for metric, minimum in p.evaluate.thresholds.items():
        if metric not in GATED_METRICS:
            _fail(f"evaluate.thresholds.{metric}", minimum, f"a threshold on one of {', '.join(GATED_METRICS)}")
        if not 0 <= minimum <= 1:
            _fail(f"evaluate.thresholds.{metric}", minimum, "a number between 0 and 1")


def from_dict(raw: Any) -> Params:
    params = _build(Params, raw, "")
    _validate(params)
    return params


def read_yaml(text: str):
    """YAML 1.2, as DVC reads and writes params.yaml: `dvc exp run -S lr=1e-5` writes 1e-05,
    which YAML 1.1 (PyYAML) would read back as a string."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load(path: str | os.PathLike = "params.yaml") -> Params:
    from ruamel.yaml import YAMLError

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params: {path} not found; run graftline from the project folder that holds params.yaml")
    try:
        raw = read_yaml(path.read_text())
    except YAMLError as exc:
        raise ParamsError(f"params: {path} is not valid YAML: {exc}") from None
    return from_dict(raw)

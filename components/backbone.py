"""The backbone: the network a model's features come from, built once from ``params.base`` (and input_block).

A backbone is one base or several side by side (``base.model: a+b+c``): every base sees the photo at
``base.image_size`` (by default the largest of their own sizes) times ``input_block.upsample``, normalised its
own way (its spec's preprocessing), and their pooled features join in the order the bases are named. A single
base is a backbone of one: nothing outside this module asks how many bases there are. What is known of each
architecture (its weights, sizes, alpha, preprocessing, whether it has pretrained weights) is data on its
``base_models.BaseSpec``.

``fine_tune_at`` opens every base from the same point: an index is each base's own layer index (so it must not
pass the end of the shortest base), a layer name that layer in each base (every base must have it). BatchNorm
stays frozen, but in a base that exists as an architecture only (AlexNet: nothing pretrained to keep).

This module builds no TensorFlow graph at import: params validation (``problems``, ``default_size``) reads only
the registry.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components import base_models
from components.base_models import KERAS_PREFIX, REGISTRY
from components.errors import GraftlineError

JOIN = "+"
FROZEN = -1  # fine_tune_at: no layer of any base trains
# Random weights (base.weights: none) are drawn from this seed, not from params' `seed`: the bottleneck then
# computes the same features whatever `seed` is, so changing it re-runs the training stages only.
RANDOM_WEIGHTS_SEED = 1


def names(model: str) -> tuple[str, ...]:
    """The bases ``base.model`` names, in order: one, or several joined by '+' (a keras: path is one base)."""
    return (model,) if model.startswith(KERAS_PREFIX) else tuple(model.split(JOIN))


def default_size(model: str) -> int | None:
    """What ``base.image_size: 0`` stands for: the base's own input size, the largest of several bases' (a base
    gains from a larger photo than it was trained on, and one decode serves all); None for a keras: base or an
    unknown name (params validation says what is wrong)."""
    sizes = [REGISTRY[name].default_size for name in names(model) if name in REGISTRY]
    return max(sizes) if sizes and len(sizes) == len(names(model)) else None


def problems(base, upsample: int) -> list[tuple[str, object, str]]:
    """(key, value, what is allowed) for each ``base.*`` value this backbone cannot take, first problem first."""
    model = base.model
    if model.startswith(KERAS_PREFIX):
        return [] if base.image_size >= 8 else [
            ("base.image_size", base.image_size, "an integer >= 8, the input size of the keras: model")]
    if base.feature_layer:
        return [("base.feature_layer", base.feature_layer, f"'' for {model} (it applies to keras:<path> bases)")]
    parts = names(model)
    known = ", ".join(sorted(REGISTRY))
    for name in parts:
        if name not in REGISTRY:
            allowed = (f"one of {known}, or keras:<path to a .keras model>" if len(parts) == 1 else
                       f"bases joined by '{JOIN}', each one of {known} ({name!r} is not)")
            return [("base.model", model, allowed)]
    if len(set(parts)) < len(parts):
        return [("base.model", model, "each base named once")]
    if len(parts) > 1 and base.weights not in ("imagenet", "none"):
        return [("base.weights", base.weights, f"imagenet or none: {model} joins several bases, and a weights "
                                               "file is one base's")]
    found = []
    for name in parts:
        found += REGISTRY[name].problems(base.alpha, base.image_size * upsample, base.weights)
    return found


@dataclass(frozen=True)
class Base:
    """One network of a backbone, its weights file resolved."""
    name: str  # a REGISTRY name, or keras:<path>
    alpha: float
    image_size: int  # what the network sees: base.image_size x input_block.upsample
    weights: str | None  # the weights file; None: random weights
    feature_layer: str = ""  # keras: bases only

    @property
    def preprocessing(self) -> str:
        """components.images.ImagePreprocessing's mode; a self-trained (keras:) base normalises inside itself."""
        return REGISTRY[self.name].preprocessing if self.name in REGISTRY else "raw"

    @property
    def learns_batchnorm(self) -> bool:
        """True for an architecture without pretrained weights (AlexNet): its BatchNorm learns its statistics in
        fine-tuning. Every other base keeps them, random-weight stand-ins included."""
        return self.name in REGISTRY and not REGISTRY[self.name].has_weights

    def build(self):
        """The network without its classifier, ending in its pooled features. Random weights are the same in
        every stage and for every `seed`: Keras draws each initializer's seed from Python's ``random`` when the
        layer is made, so that is seeded here alone, and put back after."""
        if self.weights is not None:
            return base_models.build_base(self.name, self.alpha, self.image_size, self.weights, self.feature_layer)
        import random

        state = random.getstate()
        random.seed(RANDOM_WEIGHTS_SEED)
        try:
            return base_models.build_base(self.name, self.alpha, self.image_size, None, self.feature_layer)
        finally:
            random.setstate(state)


@dataclass(frozen=True)
class Backbone:
    """The bases, the photo size and the input block: everything that turns a photo into features."""
    model: str  # base.model as params spell it
    alpha: float
    image_size: int  # the photo's size, before upsampling
    bases: tuple[Base, ...]
    upsample: int = 1
    noise: float = 0.0  # GaussianNoise in front of each base, in training only
    seed: int | None = None

    @classmethod
    def from_params(cls, params, training: bool = True) -> Backbone:
        """The backbone ``params`` describe, each base's weights found (fetched once when missing). ``training``
        False leaves out the input block's noise (it acts only in training), and does not read it."""
        b, block = params.base, params.input_block
        upsample = block.upsample
        bases = tuple(Base(name, b.alpha, b.image_size * upsample,
                           base_models.resolve_weights(name, b.alpha, b.image_size, b.weights), b.feature_layer)
                      for name in names(b.model))
        noise = block.noise if training else 0.0
        return cls(b.model, b.alpha, b.image_size, bases, upsample, noise, params.seed if noise else None)

    @property
    def cacheable(self) -> bool:
        """Whether its features go in the feature cache, named by its weights files: random weights have none."""
        return all(base.weights is not None for base in self.bases)

    def fingerprint(self, engine: str = "tensorflow") -> str:
        """Everything that decides what the backbone computes from a photo, hashed: the name of its feature cache
        folder (the bottleneck's), which starts with the model's name so that a person can tell caches apart.
        ``engine``: what runs it (components/engines.py); TensorFlow's fingerprint is the one caches had before
        there was a choice."""
        from components import images
        from components.fetch import sha256_of

        spec = {
            "model": self.model, "alpha": self.alpha, "image_size": self.image_size,
            "weights_sha256": JOIN.join(sha256_of(Path(base.weights)) for base in self.bases),
            "feature_layer": self.bases[0].feature_layer, "upsample": self.upsample,
            "preprocessing": JOIN.join(base.preprocessing for base in self.bases),
            "decode": images.DECODE_VERSION,
        }
        if engine != "tensorflow":
            spec["engine"] = engine
        tag = "keras" if self.model.startswith(KERAS_PREFIX) else self.model
        return f"{tag}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def base_fingerprints(self) -> list[str]:
        """Each base's fingerprint as a backbone of one (its activation caches live under it)."""
        return [Backbone(base.name, self.alpha, self.image_size, (base,), self.upsample).fingerprint()
                for base in self.bases]

    def _tag(self, index: int) -> str:
        """The suffix of a branch's layer names: none for a backbone of one."""
        return f"_{self.bases[index].name}" if len(self.bases) > 1 else ""

    def extractor(self):
        """[0, 255] RGB photos -> features: per base, its preprocessing, the input block (the CIFAR recipe's noise
        in the base's input scale and integer upsampling), the base in inference mode; the bases' pooled features
        side by side. Every base is frozen until ``open_from`` opens it."""
        import keras

        from components.images import ImagePreprocessing

        photo = keras.Input((self.image_size, self.image_size, 3), name="image")
        branches = []
        for i, base in enumerate(self.bases):
            tag = self._tag(i)
            x = ImagePreprocessing(base.preprocessing, name=f"preprocessing{tag}")(photo)
            if self.noise:
                x = keras.layers.GaussianNoise(self.noise, seed=self.seed, name=f"input_noise{tag}")(x)
            if self.upsample > 1:
                x = keras.layers.UpSampling2D(self.upsample, interpolation="bilinear", name=f"input_upsample{tag}")(x)
            net = base.build()
            net.trainable = False
            # training=False keeps BatchNorm in inference mode even when layers are unfrozen.
            branches.append(net(x, training=False))
        return keras.Model(photo, joined(branches), name="feature_extractor")

    def parts(self, extractor) -> list:
        """The extractor as one model per base (photo -> that base's features, its preprocessing included),
        sharing its weights; their outputs side by side are the extractor's."""
        import keras

        if len(self.bases) == 1:
            return [extractor]
        return [keras.Model(extractor.inputs, output, name=f"{base.name}_features")
                for base, output in zip(self.bases, extractor.get_layer("features").input)]

    def branches(self, extractor) -> list[tuple[list, object]]:
        """Per base, in order: the layers between the photo and the base (preprocessing, input block), and the
        base itself, as ``extractor()`` built them."""
        nets = networks(extractor)
        found = []
        for i, net in enumerate(nets):
            tag = self._tag(i)
            front = [f"preprocessing{tag}"] + [f"input_noise{tag}"] * bool(self.noise) + \
                [f"input_upsample{tag}"] * (self.upsample > 1)
            found.append(([extractor.get_layer(name) for name in front], net))
        return found

    def fine_tune_indices(self, extractor, fine_tune_at: int | str) -> list[int | None]:
        """``fine_tune_at`` as each base's own layer index (None: frozen); one line naming the base otherwise."""
        nets = networks(extractor)
        if fine_tune_at == FROZEN:
            return [None] * len(nets)
        layer_names = [[layer.name for layer in net.layers] for net in nets]
        if isinstance(fine_tune_at, str):
            lacking = [base.name for base, known in zip(self.bases, layer_names) if fine_tune_at not in known]
            if not lacking:
                return [known.index(fine_tune_at) for known in layer_names]
            known = layer_names[self.bases.index(next(b for b in self.bases if b.name == lacking[0]))]
            nearest = difflib.get_close_matches(fine_tune_at, known, n=5, cutoff=0.5) or known[-3:]
            where = "" if len(self.bases) == 1 else f" (every base of {self.model} must have it)"
            raise GraftlineError(f"params: fine_tune_at = {fine_tune_at!r} is not a layer of {lacking[0]}{where}; "
                                 f"the nearest names: {', '.join(nearest)} (or give a layer index, "
                                 f"0..{min(map(len, layer_names))})")
        shortest = min(range(len(nets)), key=lambda i: len(layer_names[i]))
        count = len(layer_names[shortest])
        if fine_tune_at > count:
            each = "" if len(self.bases) == 1 else " (an index is each base's own)"
            raise GraftlineError(
                f"params: fine_tune_at = {fine_tune_at} is past the end of {self.bases[shortest].name}, which has "
                f"{count} layers{each}; use 0..{count} (0 trains all, {count} none), a layer name, or -1 to freeze "
                "the backbone.")
        return [fine_tune_at] * len(nets)

    def open_from(self, extractor, fine_tune_at: int | str) -> list[dict]:
        """Make each base trainable from ``fine_tune_at`` up, its BatchNorm layers frozen (but in a base that
        learns them); returns what was opened, per base (``opening``)."""
        import keras

        indices = self.fine_tune_indices(extractor, fine_tune_at)
        for base, net, at in zip(self.bases, networks(extractor), indices):
            net.trainable = at is not None
            for layer in net.layers[: at or 0]:
                layer.trainable = False
            # BatchNorm stays in inference mode: in Keras 3, fit's training=True overrides the training=False the
            # base is called with (keras-team/keras#20285), and only a frozen BatchNormalization layer keeps its
            # moving statistics fixed.
            for layer in base_models.all_layers(net) if not base.learns_batchnorm else ():
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        return self.opening(extractor, fine_tune_at)

    def opening(self, extractor, fine_tune_at: int | str) -> list[dict]:
        """Per base: its name, layer count, where it opens (None: frozen), how many layers train and how many of
        those are BatchNorm layers kept frozen."""
        import keras

        described = []
        for base, net, at in zip(self.bases, networks(extractor), self.fine_tune_indices(extractor, fine_tune_at)):
            opened = net.layers[at:] if at is not None else []
            described.append({
                "model": base.name, "layers": len(net.layers), "opened_from": at, "trainable_layers": len(opened),
                "frozen_batchnorm_layers": sum(isinstance(layer, keras.layers.BatchNormalization)
                                               and not base.learns_batchnorm for layer in opened)})
        return described


def joined(features: list):
    """The bases' pooled features side by side, in order (one base's as they are)."""
    import keras

    return features[0] if len(features) == 1 else keras.layers.Concatenate(name="features")(features)


def networks(model) -> list:
    """The bases inside an extractor, or inside a model that holds one (a classifier, the exported model with
    its test-time flip), in order."""
    inner = [layer for layer in base_models.all_layers(model) if layer.name == "feature_extractor"]
    extractor = inner[0] if inner else model
    return [layer for layer in extractor.layers if hasattr(layer, "layers")]

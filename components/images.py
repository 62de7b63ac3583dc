"""The ONE image path: decode + resize (TF ops) and the base model's normalisation.

Bottleneck extraction, fine-tuning, evaluation, predict and the exported
serving signature all call ``decode_and_resize``; the normalisation lives
inside every model as an ``ImagePreprocessing`` layer, so a model always takes
RGB pixels in [0, 255] and nobody normalises twice or forgets to. A second
copy of this code anywhere would be a training/serving-skew bug.
"""
from __future__ import annotations

import keras
import tensorflow as tf

# Normalisation modes and constants as keras.applications.imagenet_utils has them, and EfficientNet-Lite's.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
MODES = ("tf", "torch", "caffe", "lite", "raw")
# Part of the feature cache's fingerprint: bump it whenever decode_and_resize changes.
DECODE_VERSION = "tf.io.decode_image+bilinear/1"
# Views of a photo that fine-tuning caches (components/activations.py) and test-time augmentation
# averages over: the photo as it is, and mirrored left to right. Bump VIEW_VERSION if view() changes.
VIEWS = ("identity", "flip")
VIEW_VERSION = "identity,flip/1"


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 [image_size, image_size, 3] RGB in [0, 255].

    Bilinear resize without crop or antialiasing, as the TensorFlow tutorial's
    ``image_dataset_from_directory`` does.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image.set_shape((image_size, image_size, 3))
    return image


def header_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """int64 width x height as an encoded photo's header states it, nothing decoded: JPEG, PNG, GIF, BMP (the
    formats decode_image reads); 0 for anything else, which decoding then refuses."""
    length = tf.strings.length(image_bytes)

    def number(offset: int, size: int, little_endian: bool) -> tf.Tensor:
        digits = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, offset, size), tf.uint8), tf.int64)
        digits = tf.reverse(digits, [0]) if little_endian else digits
        return tf.reduce_sum(digits * tf.constant([256 ** (size - 1 - i) for i in range(size)], tf.int64))

    def signed32(value: tf.Tensor) -> tf.Tensor:  # BMP's height is negative for top-down rows
        return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))

    def jpeg() -> tf.Tensor:
        return tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2], tf.int64))

    def starts(magic: bytes) -> tf.Tensor:  # substr cuts a shorter photo short: no error
        return tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic)

    is_long = length >= 26  # every offset read below lies within
    return tf.case([
        (tf.io.is_jpeg(image_bytes), jpeg),
        (is_long & starts(b"\x89PNG"), lambda: number(16, 4, False) * number(20, 4, False)),
        (is_long & starts(b"GIF"), lambda: number(6, 2, True) * number(8, 2, True)),
        (is_long & starts(b"BM"), lambda: signed32(number(18, 4, True)) * signed32(number(22, 4, True))),
    ], default=lambda: tf.constant(0, tf.int64), exclusive=False)


def refuse_above(image_bytes: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """An op that fails (InvalidArgumentError, one message) when any photo of the [batch] ``image_bytes`` states
    more than ``max_pixels`` pixels: run before decoding, a 100-MP JPEG never becomes 300 MB of pixels."""
    pixels = tf.map_fn(header_pixels, image_bytes, fn_output_signature=tf.int64)
    return tf.debugging.assert_less_equal(
        pixels, tf.constant(max_pixels, tf.int64),
        message=f"a photo has more pixels than data.max_pixels = {max_pixels} (the limit this model was exported "
                "with); downscale it first")


def decode_batch(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """A [batch] string tensor -> float32 [batch, image_size, image_size, 3]."""
    return tf.map_fn(
        lambda b: decode_and_resize(b, image_size),
        image_bytes,
        fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32),
    )


def view(images, name: str):
    """A [batch, height, width, 3] tensor as one of VIEWS."""
    if name == "identity":
        return images
    if name == "flip":
        return keras.ops.flip(images, axis=-2)
    raise ValueError(f"unknown view {name!r}; expected one of {VIEWS}")


@keras.saving.register_keras_serializable(package="graftline")
class WithMirrors(keras.layers.Layer):
    """[batch, h, w, c] -> [2 * batch, h, w, c]: the photos, then each mirrored left to right."""

    def call(self, images):
        return keras.ops.concatenate([images, view(images, "flip")], axis=0)

    def compute_output_shape(self, input_shape):
        return (None if input_shape[0] is None else 2 * input_shape[0],) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="graftline")
class MeanOfHalves(keras.layers.Layer):
    """[2 * batch, classes] -> [batch, classes]: the mean of each photo's and its mirror's probabilities."""

    def call(self, probabilities):
        first, second = keras.ops.split(probabilities, 2, axis=0)
        return (first + second) / 2

    def compute_output_shape(self, input_shape):
        return (None if input_shape[0] is None else input_shape[0] // 2,) + tuple(input_shape[1:])


def with_flip_averaged(classifier):
    """Test-time augmentation: a model whose output is the mean of ``classifier`` on the photo and its mirror.

    The photo and its mirror go through ``classifier`` as one batch of two, so one photo's
    figures still do not depend on other photos (components/inference.py). Serving, TFLite and
    evaluate all use this model, so every figure of the exported model includes it.
    """
    image = keras.Input(classifier.input_shape[1:], name="image")
    both = classifier(WithMirrors(name="with_mirrors")(image))
    return keras.Model(image, MeanOfHalves(name="flip_average", dtype="float32")(both), name="tta_flip")


@keras.saving.register_keras_serializable(package="graftline")
class ImagePreprocessing(keras.layers.Layer):
    """[0, 255] RGB -> the base model's expected input (keras.applications modes)."""

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
        self.mode = mode

    def call(self, images):
        images = keras.ops.cast(images, "float32")
        if self.mode == "tf":  # MobileNet, Inception, EfficientNet's keras port: [-1, 1]
            return images / 127.5 - 1.0
        if self.mode == "torch":  # [0, 1] then ImageNet mean/std
            return (images / 255.0 - keras.ops.array(TORCH_MEAN_RGB)) / keras.ops.array(TORCH_STD_RGB)
        if self.mode == "caffe":  # VGG, ResNet50: BGR, ImageNet mean subtracted
            return keras.ops.flip(images, axis=-1) - keras.ops.array(CAFFE_MEAN_BGR)
        if self.mode == "lite":  # EfficientNet-Lite: TensorFlow Lite's mean 127, std 128
            return (images - 127.0) / 128.0
        return images  # "raw": the model normalises itself (EfficientNet, self-trained bases)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}

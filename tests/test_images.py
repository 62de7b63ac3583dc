"""components/images.py: the one decode + resize path and the in-model preprocessing layer."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from components import images
from components.images import ImagePreprocessing, decode_and_resize, decode_batch
from drawing import encode, pixels, solid

FORMATS = ("PNG", "JPEG", "GIF", "BMP")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [24, 40])
def test_decode_and_resize_shape_dtype_range(fmt, size):
    data = encode(pixels((30, 200, 90), (48, 36), seed=1), fmt)
    out = decode_and_resize(tf.constant(data), size)
    assert out.dtype == tf.float32
    assert out.shape == (size, size, 3)
    values = out.numpy()
    assert values.min() >= 0.0 and values.max() <= 255.0
    # Pixels, not [0, 1] or [-1, 1]: a patterned photo spans most of the byte range.
    assert values.max() > 150.0


@pytest.mark.parametrize("fmt, tolerance", [("PNG", 0.0), ("BMP", 0.0), ("GIF", 0.0), ("JPEG", 4.0)])
@pytest.mark.parametrize("color", [(200, 30, 60), (10, 120, 250)])
def test_solid_colour_keeps_its_colour(fmt, tolerance, color):
    data = encode(solid(color, (50, 30)), fmt)
    out = decode_and_resize(tf.constant(data), 32).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(np.float32(color), (32, 32, 3)), atol=tolerance + 1e-4)


def test_resize_squashes_without_cropping():
    # A 64x32 photo with a green strip along its left edge: a centre crop would lose it.
    array = solid((220, 40, 40), (64, 32))
    array[:, :8] = (40, 200, 40)
    out = decode_and_resize(tf.constant(encode(array, "PNG")), 32).numpy()
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(np.float32((40, 200, 40)), (32, 3)), atol=1e-3)
    np.testing.assert_allclose(out[:, -1], np.broadcast_to(np.float32((220, 40, 40)), (32, 3)), atol=1e-3)
    green_columns = np.sum(np.all(np.abs(out[0] - (40, 200, 40)) < 1, axis=-1))
    assert 2 <= green_columns <= 5  # 8 of 64 columns -> about 4 of 32


def test_grey_png_becomes_three_equal_channels():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), 77, np.uint8), "L").save(buf, "PNG")
    out = decode_and_resize(tf.constant(buf.getvalue()), 16).numpy()
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, 77.0)


def test_decode_batch_equals_decode_one_by_one():
    blobs = [encode(pixels((200, 40, 40), (30, 20), seed=s), fmt) for s, fmt in ((1, "PNG"), (2, "JPEG"), (3, "BMP"))]
    batch = decode_batch(tf.constant(blobs), 24).numpy()
    assert batch.shape == (3, 24, 24, 3) and batch.dtype == np.float32
    for i, blob in enumerate(blobs):
        np.testing.assert_array_equal(batch[i], decode_and_resize(tf.constant(blob), 24).numpy())


# ---------------------------------------------------------------- ImagePreprocessing


@pytest.fixture
def random_pixels():
    return np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)


def test_tf_mode_matches_mobilenet_v2_preprocess_input(random_pixels):
    expected = keras.applications.mobilenet_v2.preprocess_input(random_pixels.copy())
    got = np.asarray(ImagePreprocessing("tf")(random_pixels.copy()))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_caffe_mode_matches_vgg16_preprocess_input(random_pixels):
    expected = keras.applications.vgg16.preprocess_input(random_pixels.copy())
    got = np.asarray(ImagePreprocessing("caffe")(random_pixels.copy()))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # BGR order: the first output channel comes from the blue input channel.
    np.testing.assert_allclose(got[..., 0], random_pixels[..., 2] - 103.939, atol=1e-4)


def test_caffe_mode_matches_resnet50_preprocess_input(random_pixels):
    expected = keras.applications.resnet50.preprocess_input(random_pixels.copy())
    np.testing.assert_allclose(np.asarray(ImagePreprocessing("caffe")(random_pixels.copy())), expected, atol=1e-4)


def test_torch_mode_is_close_to_keras_torch_preprocess_input(random_pixels):
    """Loose check: [0, 1] scaling, per-channel mean and std in RGB order (catches a wrong formula)."""
    expected = keras.applications.imagenet_utils.preprocess_input(random_pixels.copy(), mode="torch")
    got = np.asarray(ImagePreprocessing("torch")(random_pixels.copy()))
    np.testing.assert_allclose(got, expected, atol=2e-2)


def test_torch_mode_equals_keras_torch_preprocess_input(random_pixels):
    expected = keras.applications.imagenet_utils.preprocess_input(random_pixels.copy(), mode="torch")
    got = np.asarray(ImagePreprocessing("torch")(random_pixels.copy()))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_raw_mode_is_identity_and_unknown_mode_is_refused(random_pixels):
    np.testing.assert_array_equal(np.asarray(ImagePreprocessing("raw")(random_pixels)), random_pixels)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        ImagePreprocessing("imagenet")


def test_uint8_input_is_accepted():
    x = np.array([[[[0, 127, 255]]]], np.uint8)
    np.testing.assert_allclose(np.asarray(ImagePreprocessing("tf")(x)), [[[[-1.0, 127 / 127.5 - 1, 1.0]]]], atol=1e-6)


def test_model_with_the_layer_saves_and_loads_with_same_outputs(tmp_path, random_pixels):
    inputs = keras.Input((8, 8, 3))
    x = ImagePreprocessing("caffe", name="preprocessing")(inputs)  # not the default mode: get_config must keep it
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(x)
    model = keras.Model(inputs, outputs)
    before = np.asarray(model.predict(random_pixels, verbose=0))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("preprocessing")
    assert isinstance(layer, images.ImagePreprocessing) and layer.mode == "caffe"
    np.testing.assert_allclose(np.asarray(loaded.predict(random_pixels, verbose=0)), before, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------ data.max_pixels, from the header


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR stating ``width`` x ``height``, and nothing else: only a header reader answers."""
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_header_pixels_reads_the_size_without_decoding(fmt):
    data = encode(pixels(size=(37, 23)), fmt)
    assert int(images.header_pixels(tf.constant(data))) == 37 * 23
    assert int(images.header_pixels(tf.constant(png_header(20_000, 30_000)))) == 600_000_000
    assert int(images.header_pixels(tf.constant(b"not an image at all, not at all"))) == 0


def test_serve_refuses_a_photo_above_max_pixels_before_decoding_it(tmp_path):
    from components import export

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)))
    export.saved_model(model, ["a", "b"], 32, tmp_path / "saved", max_pixels=1000)
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serve"]
    small = encode(pixels(size=(40, 25)), "PNG")  # exactly 1000
    assert serve(image_bytes=tf.constant([small]))["probabilities"].shape == (1, 2)
    for refused in (encode(pixels(size=(41, 25)), "JPEG"), png_header(20_000, 30_000)):  # the second has no pixels
        with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than data.max_pixels = 1000"):
            serve(image_bytes=tf.constant([small, refused]))

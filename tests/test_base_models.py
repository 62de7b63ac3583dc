"""components/base_models.py: finding ImageNet weights offline, and the feature extractor's shape."""
from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest

from components import base_models
from components.backbone import networks
from components.errors import GraftlineError
from conftest import backbone_of

KERAS_NAME_160 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"


@pytest.fixture
def offline(monkeypatch):
    """Every download attempt fails as it does on a machine without network; the calls are counted."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras-home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def test_none_means_random_weights(offline):
    assert base_models.resolve_weights("mobilenet_v2", 1.0, 160, "none") is None
    assert offline == []


def test_missing_weights_path_names_base_weights(tmp_path, offline):
    missing = tmp_path / "nope.h5"
    with pytest.raises(GraftlineError) as info:
        base_models.resolve_weights("mobilenet_v2", 1.0, 160, str(missing))
    assert "base.weights" in str(info.value) and str(missing) in str(info.value)
    assert offline == []


def test_existing_weights_path_is_returned(tmp_path, offline):
    path = tmp_path / "mine.h5"
    path.write_bytes(b"weights")
    assert base_models.resolve_weights("mobilenet_v2", 1.0, 160, str(path)) == str(path)
    assert offline == []


def test_imagenet_offline_names_keras_file_folder_and_base_weights(keras_home, offline):
    with pytest.raises(GraftlineError) as info:
        base_models.resolve_weights("mobilenet_v2", 1.0, 160, "imagenet")
    message = str(info.value)
    assert KERAS_NAME_160 in message
    assert str(keras_home / "models") in message
    assert "base.weights" in message
    assert offline == [base_models.KERAS_APPS_URL + "mobilenet_v2/" + KERAS_NAME_160]
    assert list((keras_home / "models").iterdir()) == []  # no partial file that would pass for weights


def test_imagenet_file_already_in_keras_home_is_used_without_network(keras_home, offline):
    (keras_home / "models").mkdir()
    weights = keras_home / "models" / KERAS_NAME_160
    weights.write_bytes(b"pretend h5")
    assert base_models.resolve_weights("mobilenet_v2", 1.0, 160, "imagenet") == str(weights)
    assert offline == []


def test_keras_home_defaults_to_dot_keras(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert base_models.keras_models_dir() == tmp_path / ".keras" / "models"


@pytest.mark.parametrize(
    "alpha, size, name",
    [
        (1.0, 160, KERAS_NAME_160),
        (0.35, 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"),
        (1.4, 224, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.4_224_no_top.h5"),
        (1, 128, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"),
        # Keras falls back to the 224 file for sizes it has no weights for.
        (0.5, 100, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"),
    ],
)
def test_mobilenet_v2_file_names_are_the_ones_keras_uses(alpha, size, name):
    from keras.src.applications import mobilenet_v2

    got_name, url = base_models.REGISTRY["mobilenet_v2"].weights_file(alpha, size)
    assert got_name == name
    assert url == mobilenet_v2.BASE_WEIGHT_PATH + name


def test_fixed_weight_files_are_the_ones_keras_uses():
    from keras.src.applications import efficientnet, inception_v3, resnet, vgg16

    expected = {
        "vgg16": vgg16.WEIGHTS_PATH_NO_TOP,
        "inception_v3": inception_v3.WEIGHTS_PATH_NO_TOP,
        "resnet50": resnet.BASE_WEIGHTS_PATH + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "efficientnet_b0": efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5",
    }
    for model, url in expected.items():
        name, got = base_models.REGISTRY[model].weights_file(1.0, 224)
        assert got == url, model
        assert url.endswith("/" + name), model


def test_problems_name_bad_alpha_and_small_images():
    spec = base_models.REGISTRY["mobilenet_v2"]
    assert spec.problems(alpha=0.35, image_size=96) == []
    assert [(k, v) for k, v, _ in spec.problems(alpha=0.6, image_size=96)] == [("base.alpha", 0.6)]
    assert [(k, v) for k, v, _ in spec.problems(alpha=1.0, image_size=31)] == [("base.image_size", 31)]
    assert base_models.REGISTRY["vgg16"].problems(alpha=0.6, image_size=32) == []  # alpha means nothing to VGG


def extractor_of(alpha: float, size: int = 96):
    return backbone_of(base={"model": "mobilenet_v2", "alpha": alpha, "image_size": size, "weights": "none"}).extractor()


@pytest.fixture(scope="module")
def small_extractor():
    return extractor_of(0.35)


def test_feature_extractor_outputs_the_pooled_feature_vector(small_extractor):
    assert tuple(small_extractor.output.shape) == (None, 1280)
    assert small_extractor.output.shape[1] == base_models.REGISTRY["mobilenet_v2"].feature_width(0.35)
    assert tuple(small_extractor.input.shape) == (None, 96, 96, 3)
    assert small_extractor.get_layer("preprocessing").mode == "tf"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    out = np.asarray(small_extractor.predict(pixels, verbose=0))
    assert out.shape == (2, 1280) and np.isfinite(out).all()


def test_networks_finds_the_keras_application(small_extractor):
    [base] = networks(small_extractor)
    assert base.name.startswith("mobilenetv2")
    assert len(base.layers) > 100


def test_feature_width_of_a_wide_mobilenet_matches_keras():
    extractor = extractor_of(1.3)
    assert extractor.output.shape[1] == base_models.REGISTRY["mobilenet_v2"].feature_width(1.3) == 1664


def test_unloadable_weights_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(GraftlineError) as info:
        base_models.build_base("mobilenet_v2", 0.35, 96, str(bad))
    assert str(bad) in str(info.value) and "base.weights" in str(info.value)


def test_random_weights_are_the_same_for_every_seed_so_seed_does_not_reach_the_bottleneck():
    import random

    import keras

    from pipeline import stages

    base = backbone_of(base={"model": "mobilenet_v2", "alpha": 0.35, "image_size": 96, "weights": "none"}).bases[0]
    drawn = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        before = random.random()
        keras.utils.set_random_seed(seed)
        weights = base.build().get_weights()
        assert random.random() == before  # the caller's random state is put back: its later draws do not change
        drawn.append(weights)
    assert all(np.array_equal(a, b) for a, b in zip(*drawn)) and any(np.std(w) > 0 for w in drawn[0])
    assert not stages.STAGES["bottleneck"].seeded and stages.STAGES["train_head"].seeded

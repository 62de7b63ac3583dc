"""Base models, the classifier's frozen layers, BatchNorm, the input block, heads, presets."""
from __future__ import annotations

import numpy as np
import pytest

from components import base_models
from components.backbone import Backbone, networks
from components.stages import fine_tune, train_head
from conftest import backbone_of
from components import head as head_lib
from components.errors import GraftlineError
from pipeline import params as params_mod
from pipeline import presets, runtime

# name -> (keras.applications module with its preprocess_input, small size that builds fast)
BASES = {
    "mobilenet_v2": ("mobilenet_v2", 32),
    "inception_v3": ("inception_v3", 75),
    "vgg16": ("vgg16", 32),
    "resnet50": ("resnet50", 32),
    "efficientnet_b0": ("efficientnet", 32),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_each_base_builds_with_its_width_and_preprocessing(name):
    import importlib

    import keras

    module, size = BASES[name]
    extractor = backbone_of(base={"model": name, "image_size": size, "weights": "none"}).extractor()
    assert extractor.output_shape == (None, base_models.REGISTRY[name].feature_width(1.0))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    ours = extractor.get_layer("preprocessing")(pixels)
    theirs = importlib.import_module(f"keras.applications.{module}").preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)
    [net] = networks(extractor)
    assert len(net.layers) > 10 and not extractor.trainable_weights  # frozen until fine-tune opens it
    del keras


def make_params(**overrides):
    raw = {"data": {"source": "unused", "sha256": ""},
           "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": 64, "weights": "none"}, "fine_tune_at": 100}
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[section] = value
    return params_mod.from_dict(raw)


def classifier(**overrides):
    """(classifier, its one base, what it opened)."""
    params = make_params(**overrides)
    runtime.configure(params.seed)
    head = head_lib.build_head(1280, 3, 0.2)
    model, opened = fine_tune.build_classifier(params, Backbone.from_params(params), head)
    [base] = networks(model)
    return model, base, opened


@pytest.mark.parametrize("fine_tune_at,unfrozen", [(0, 155), (100, 55), (150, 5), (155, 0), (-1, 0)])
def test_fine_tune_at_sets_how_many_base_layers_train(fine_tune_at, unfrozen):
    import keras

    model, base, [described] = classifier(fine_tune_at=fine_tune_at)
    assert len(base.layers) == described["layers"] == 155
    assert described["trainable_layers"] == unfrozen
    opened = base.layers[len(base.layers) - unfrozen:] if unfrozen else []
    assert described["frozen_batchnorm_layers"] == sum(isinstance(l, keras.layers.BatchNormalization) for l in opened)
    assert all(not layer.trainable for layer in base.layers[:len(base.layers) - unfrozen])
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in opened)
    weighted = [l for l in opened if l.weights and not isinstance(l, keras.layers.BatchNormalization)]
    assert len(model.trainable_weights) == sum(len(l.trainable_weights) for l in weighted) + 2  # + head


def test_fine_tune_at_past_the_base_is_named():
    with pytest.raises(GraftlineError, match=r"fine_tune_at = 156 .* 155 layers"):
        classifier(fine_tune_at=156)


def test_batchnorm_stays_in_inference_mode_while_the_layers_around_it_train():
    import keras

    model, base, _ = classifier(fine_tune_at=100)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    opened_bn = [l for l in base.layers[100:] if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in base.layers[100:] if isinstance(l, keras.layers.Conv2D)]
    stats = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in opened_bn]
    kernel = convs[-1].kernel.numpy().copy()
    x = np.random.default_rng(1).uniform(0, 255, (8, 64, 64, 3)).astype(np.float32)
    model.fit(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]), epochs=2, batch_size=4, verbose=0)
    for layer, (mean, variance) in zip(opened_bn, stats):  # statistics untouched by training batches
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), variance)
    assert not np.array_equal(convs[-1].kernel.numpy(), kernel)  # while the convolutions learn


def test_input_block_noise_only_in_training_and_upsampling_always():
    params = make_params(input_block={"noise": 0.5, "upsample": 2}, base={"model": "mobilenet_v2", "alpha": 0.35,
                                                                          "image_size": 32, "weights": "none"})
    runtime.configure(0)
    extractor = Backbone.from_params(params).extractor()
    assert networks(extractor)[0].input_shape == (None, 64, 64, 3)  # the base sees 2x
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    inference = [np.asarray(extractor(x, training=False)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    training = np.asarray(extractor(x, training=True))
    # random weights: features near 0, so the noise is judged against their size
    assert np.abs(training - inference[0]).max() > 0.1 * np.abs(inference[0]).max() > 0
    without_noise = Backbone.from_params(params, training=False).extractor()  # as the bottleneck builds it
    assert [l.name for l in without_noise.layers if l.name.startswith("input_")] == ["input_upsample"]


def test_upsampled_base_below_its_minimum_is_a_params_error():
    with pytest.raises(params_mod.ParamsError, match="base.image_size"):
        make_params(base={"model": "inception_v3", "image_size": 32}, input_block={"upsample": 2})
    make_params(base={"model": "inception_v3", "image_size": 40, "weights": "none"}, input_block={"upsample": 2})


def test_head_with_hidden_layer_and_auto_class_weights():
    head = head_lib.build_head(16, 3, 0.1, hidden_units=8)
    assert [l.name for l in head.layers][1:] == ["head_dropout", "head_hidden", "head_hidden_dropout", "head_dense"]
    weights = train_head.class_weights(np.array([0] * 8 + [1] * 2 + [2] * 10), 3)
    assert weights == pytest.approx({0: 20 / 24, 1: 20 / 6, 2: 20 / 30})


def test_keras_file_base_uses_the_named_layer(tmp_path):
    import keras

    from components.stages import pretrain

    model = pretrain.build_cnn(32, 5)
    model.save(tmp_path / "cnn.keras")
    path = f"keras:{tmp_path / 'cnn.keras'}"

    def extractor(layer, size=32):
        return backbone_of(base={"model": path, "image_size": size, "feature_layer": layer}).extractor()

    assert extractor("features").output_shape == (None, 128)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    cut = keras.Model(model.inputs, model.get_layer("features").output)
    np.testing.assert_allclose(np.asarray(extractor("features")(x)), np.asarray(cut(x)), rtol=1e-5, atol=1e-5)
    assert extractor("conv2").output_shape == (None, 64)  # spatial: pooled
    with pytest.raises(GraftlineError, match="not a layer"):
        extractor("nope")
    with pytest.raises(GraftlineError, match="base.image_size is 48"):
        extractor("features", 48)
    with pytest.raises(GraftlineError, match="does not apply"):
        base_models.resolve_weights(path, 1.0, 32, "none")


def test_every_preset_validates_and_applying_one_keeps_comments(tmp_path):
    import shutil

    from conftest import REPO

    folder = REPO / "presets"
    assert set(presets.names(folder)) >= {"flowers_mobilenet_v2", "flowers_inception_v3",
                                          "cats_vs_dogs_mobilenet_v2", "cifar10_vgg16", "digits"}
    base = params_mod.load(REPO / "params.yaml").to_dict()
    for name in presets.names(folder):
        params_mod.from_dict(presets.merged(base, presets.load(folder, name)))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(folder, tmp_path / "presets")
    (line,) = presets.apply("cifar10_vgg16", tmp_path / "params.yaml")
    text = (tmp_path / "params.yaml").read_text()
    assert "# Every tunable number of the pipeline." in text  # comments survive
    applied = params_mod.load(tmp_path / "params.yaml")
    assert applied.base.model == "vgg16" and applied.input_block.upsample == 2
    assert applied.input_block.noise == 0.01
    assert "-S base.model=vgg16" in line and "-S input_block.upsample=2" in line
    with pytest.raises(GraftlineError, match="no preset 'nope'"):
        presets.apply("nope", tmp_path / "params.yaml")

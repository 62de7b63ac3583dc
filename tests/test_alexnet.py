"""AlexNet from scratch (components/alexnet.py, presets/flowers_alexnet.yaml): the classic layers and their
shapes at 227 px, base.weights none as its only choice, fine_tune_at by layer name; and the preset for one
epoch end to end on the 400-photo sample (ingest, bottleneck, train_head, fine_tune, evaluate, then
`graftline scratch`), each a `graftline` command in a project folder of its own."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import alexnet, base_models
from components.backbone import networks
from components.errors import GraftlineError
from conftest import BIN, FLOWERS, REPO, backbone_of, project_env, require_shared, run
from pipeline import params as params_mod
from pipeline import presets

PRESET = "flowers_alexnet"
# The base's layers in order, with their outputs at 227 px (batch dimension left out).
LAYERS_227 = [
    ("input", (227, 227, 3)),
    ("conv1", (55, 55, 96)), ("conv1_bn", (55, 55, 96)), ("conv1_relu", (55, 55, 96)), ("pool1", (27, 27, 96)),
    ("conv2", (27, 27, 256)), ("conv2_bn", (27, 27, 256)), ("conv2_relu", (27, 27, 256)), ("pool2", (13, 13, 256)),
    ("conv3", (13, 13, 384)), ("conv3_bn", (13, 13, 384)), ("conv3_relu", (13, 13, 384)),
    ("conv4", (13, 13, 384)), ("conv4_bn", (13, 13, 384)), ("conv4_relu", (13, 13, 384)),
    ("conv5", (13, 13, 256)), ("conv5_bn", (13, 13, 256)), ("conv5_relu", (13, 13, 256)), ("pool5", (6, 6, 256)),
    ("avg_pool", (256,)),
]
# Convolution kernels and biases (11*11*3*96+96 ... 3*3*384*256+256) and batch norm's four vectors per channel.
CONV_PARAMS = 34_944 + 614_656 + 885_120 + 1_327_488 + 884_992
BN_PARAMS = 4 * (96 + 256 + 384 + 384 + 256)


def preset_params(**sections) -> dict:
    """The repo's params.yaml with the preset merged over it, then ``sections`` over that."""
    raw = params_mod.read_yaml((REPO / "params.yaml").read_text())
    merged = presets.merged(raw, presets.load(REPO / "presets", PRESET))
    return presets.merged(merged, sections)


@pytest.fixture(scope="module")
def base():
    return base_models.build_base("alexnet", 1.0, 227, None)


def test_layers_have_the_classic_names_and_shapes_at_227(base):
    assert [(layer.name, tuple(layer.output.shape[1:])) for layer in base.layers] == LAYERS_227
    assert base.count_params() == CONV_PARAMS + BN_PARAMS == 3_752_704
    conv1 = base.get_layer("conv1")
    assert conv1.kernel_size == (11, 11) and conv1.strides == (4, 4) and conv1.padding == "valid"
    assert [base.get_layer(f"conv{i}").kernel_size for i in (2, 3, 4, 5)] == [(5, 5), (3, 3), (3, 3), (3, 3)]
    assert [(p.pool_size, p.strides) for p in map(base.get_layer, ("pool1", "pool2", "pool5"))] == [((3, 3), (2, 2))] * 3


def test_registry_entry_and_extractor():
    spec = base_models.REGISTRY["alexnet"]
    assert (spec.default_size, spec.feature_width(1.0), spec.preprocessing) == (227, 256, "tf")
    backbone = backbone_of(base={"model": "alexnet", "weights": "none"})
    [base] = backbone.bases
    assert base.weights is None and base.learns_batchnorm  # an architecture only: its BatchNorm learns
    extractor = backbone.extractor()
    assert extractor.get_layer("preprocessing").mode == "tf"  # [0, 255] -> [-1, 1], inside the model
    assert [net.name for net in networks(extractor)] == ["alexnet"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 227, 227, 3)).astype(np.float32)
    features = np.asarray(extractor.predict(pixels, verbose=0))
    assert features.shape == (2, 256) and np.isfinite(features).all() and (features >= 0).all()  # pooled ReLUs


def test_default_size_is_227_and_the_smallest_is_67():
    assert params_mod.from_dict({"base": {"model": "alexnet", "weights": "none"}}).base.image_size == 227
    assert alexnet.min_image_size() == 67
    params_mod.from_dict({"base": {"model": "alexnet", "weights": "none", "image_size": 67}})
    with pytest.raises(params_mod.ParamsError, match=r"base.image_size = 66 .* >= 67 for alexnet"):
        params_mod.from_dict({"base": {"model": "alexnet", "weights": "none", "image_size": 66}})
    assert tuple(base_models.build_base("alexnet", 1.0, 67, None).get_layer("pool5").output.shape[1:]) == (1, 1, 256)


@pytest.mark.parametrize("weights", ["imagenet", "/some/alexnet.h5"])
def test_weights_other_than_none_fail_with_one_line_naming_base_weights(weights):
    with pytest.raises(params_mod.ParamsError) as info:
        params_mod.from_dict({"base": {"model": "alexnet", "weights": weights}})
    message = str(info.value)
    assert message.startswith(f"params: base.weights = {weights!r}") and "\n" not in message
    assert "alexnet has no pretrained weights here" in message and "none" in message
    # the same line from the library, for a caller that skipped params validation
    with pytest.raises(GraftlineError, match="alexnet has no pretrained weights here"):
        base_models.resolve_weights("alexnet", 1.0, 227, weights)
    assert base_models.resolve_weights("alexnet", 1.0, 227, "none") is None


def test_the_cli_says_it_in_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_params(base={"weights": "imagenet"})))
    done = subprocess.run([str(BIN / "graftline"), "check-params"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "graftline check-params: error: params: base.weights = 'imagenet' is not allowed; expected none: alexnet "
        "has no pretrained weights here (an architecture only, trained from scratch)"]


def test_fine_tune_at_names_a_classic_layer(base):
    backbone = backbone_of(base={"model": "alexnet", "weights": "none"})
    extractor = backbone.extractor()
    names = [layer.name for layer in base.layers]
    for name in ("conv3", "pool2", "conv5_bn"):
        params_mod.from_dict({"base": {"model": "alexnet", "weights": "none"}, "fine_tune_at": name})  # allowed
        assert backbone.fine_tune_indices(extractor, name) == [names.index(name)]
    assert names.index("conv3") == 9
    with pytest.raises(GraftlineError, match=r"fine_tune_at = 'conv6' is not a layer of alexnet; the nearest "
                                             r"names: conv[1-5]"):
        backbone.fine_tune_indices(extractor, "conv6")


def test_the_preset_trains_every_layer_on_images_from_scratch():
    from components.stages import fine_tune

    params = params_mod.from_dict(preset_params())
    assert (params.base.model, params.base.weights, params.base.image_size) == ("alexnet", "none", 227)
    assert params.fine_tune_at == 0 and params.fine_tune.epochs == 50 and params.fine_tune.optimizer == "adam"
    assert params.augment.flip and params.augment.rotation and params.augment.zoom
    assert not fine_tune.uses_activations(params)  # rotation and zoom: every epoch on the decoded images


# ------------------------------------------------------------------ the preset for one epoch, end to end

STAGES = ("ingest", "bottleneck", "train_head", "fine_tune", "evaluate")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """The preset with one head and one fine-tune epoch on ../shared/data/flowers: each stage's command, then
    `graftline scratch`, in a folder of their own. KERAS_HOME is empty: nothing may look for weights."""
    require_shared()
    folder = tmp_path_factory.mktemp("alexnet")
    root = folder / "project"
    root.mkdir()
    raw = preset_params(data={"source": str(FLOWERS), "sha256": "", "url": ""},
                        train_head={"epochs": 1}, fine_tune={"epochs": 1},
                        export={"tflite": ["float", "dynamic_range"]})  # both TFLite files, checked below
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = project_env(folder / "keras")
    for command in (*STAGES, "scratch"):
        run([str(BIN / "graftline"), command], root, env, folder / f"{command}.log")
    assert not (folder / "keras" / "models").exists()
    return root


def read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


@pytest.mark.e2e
def test_one_epoch_runs_every_stage_on_random_alexnet_features(one_epoch):
    ingest = read(one_epoch, "reports/ingest.json")
    assert ingest["num_examples"] == sum(ingest["splits"].values()) == 400
    bottleneck = read(one_epoch, "reports/bottleneck.json")
    assert bottleneck["base"] == {"model": "alexnet", "alpha": 1.0, "image_size": 227, "weights": ["none"]}
    assert bottleneck["feature_width"] == 256 and bottleneck["forward_passes"] == 400
    assert bottleneck["rows"] == ingest["splits"]
    head = read(one_epoch, "metrics/train_head.json")
    assert head["epochs_run"] == 1 and head["num_train"] == ingest["splits"]["train"]

    fine = read(one_epoch, "metrics/fine_tune.json")
    assert fine["epochs_run"] == 1 and fine["fine_tune_at"] == 0
    assert fine["trainable_base_layers"] == len(LAYERS_227)  # every layer opened
    assert 0 <= fine["accuracy"] <= 1 and 0 <= fine["val_accuracy"] <= 1 and np.isfinite(fine["loss"])
    report = read(one_epoch, "reports/fine_tune.json")
    assert report["trained_from"] == "images" and [b["layers"] for b in report["bases"]] == [len(LAYERS_227)]
    assert report["bases"][0]["frozen_batchnorm_layers"] == 0  # from scratch, BatchNorm learns
    assert report["train_s"] > 0 and report["test_time_augmentation"] == "none"
    assert report["learning_rate"] == {"schedule": "cosine", "per_epoch": [0.0005]}  # the cosine at mid-epoch
    assert report["tflite"]["float"]["top1_agreement"] >= 0.95  # an untrained network's close calls may differ
    assert 0 <= report["tflite"]["dynamic_range"]["top1_agreement"] <= 1

    evaluation = read(one_epoch, "metrics/evaluate.json")
    assert 0 <= evaluation["accuracy"] <= 1 and evaluation["num_test"] == ingest["splits"]["test"]
    assert sum(c["support"] for c in evaluation["per_class"].values()) == ingest["splits"]["test"]


@pytest.mark.e2e
def test_the_exported_model_is_alexnet_with_its_layers(one_epoch):
    import keras

    import components.images  # noqa: F401  (registers graftline's layers for loading)

    model_dir = one_epoch / "artifacts" / "model"
    assert (model_dir / "saved_model" / "saved_model.pb").is_file() and (model_dir / "model.tflite").is_file()
    labels = read(one_epoch, "artifacts/labels.json")
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    assert tuple(model.input_shape) == (None, 227, 227, 3) and tuple(model.output_shape) == (None, len(labels))
    [base] = networks(model)
    assert [(layer.name, tuple(layer.output.shape[1:])) for layer in base.layers] == LAYERS_227
    photo = np.random.default_rng(1).uniform(0, 255, (1, 227, 227, 3)).astype(np.float32)
    probabilities = np.asarray(model(photo))
    assert probabilities.shape == (1, len(labels)) and abs(probabilities.sum() - 1) < 1e-5


@pytest.mark.e2e
def test_scratch_trains_the_same_architecture_for_the_same_budget(one_epoch):
    scratch = read(one_epoch, "metrics/scratch.json")
    assert scratch["epochs"] == 2  # one head epoch + one fine-tune epoch
    assert 0 <= scratch["scratch_accuracy"] <= 1
    assert scratch["transfer_accuracy"] == read(one_epoch, "metrics/evaluate.json")["accuracy"]

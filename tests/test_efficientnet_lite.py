"""EfficientNet-Lite bases: reading .pth without running code, the architecture, the weight mapping
(ImageNet's daisy class on daisy photos), the conversion cache, and one whole TFX run with Lite0."""
from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import efficientnet_lite
from components.errors import GraftlineError
from components.fetch import sha256_of
from components.torch_state import RefusedPickle, load_state_dict
from conftest import FLOWERS, copy_repo, keras_home_set, project_env, require_shared, run
from pth_files import write_legacy, write_zip

IMAGENET_DAISY = 985
TENSORS = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
           "a.matrix": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
           "a.num_batches_tracked": np.array(5, dtype=np.int64)}


@pytest.mark.parametrize("write", [write_legacy, write_zip], ids=["legacy", "zip"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_state_dict_round_trips_in_both_layouts(tmp_path, write, transposed):
    state = load_state_dict(write(tmp_path / "w.pth", TENSORS, transposed=transposed))
    assert list(state) == list(TENSORS)
    for name, array in TENSORS.items():
        assert state[name].dtype == array.dtype and state[name].shape == array.shape
        np.testing.assert_array_equal(state[name], array)


class RunsACommand:
    """A pickle payload that, loaded by a plain unpickler, runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", [write_legacy, write_zip], ids=["legacy", "zip"])
def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, write):
    marker = tmp_path / "ran"
    evil = write(tmp_path / "evil.pth", {}, obj=collections.OrderedDict(w=RunsACommand(marker)))
    with pytest.raises(RefusedPickle) as refused:
        load_state_dict(evil)
    message = str(refused.value)
    assert str(evil) in message and f"{os.system.__module__}.system" in message and "\n" not in message
    assert not marker.exists()
    # The payload is real: a plain unpickler runs it (the legacy layout's fourth pickle is the object).
    if write is write_legacy:
        with open(evil, "rb") as handle:
            for _ in range(4):
                pickle.load(handle)
        assert marker.exists()


def test_truncated_or_foreign_files_fail_with_one_line(tmp_path):
    good = write_legacy(tmp_path / "w.pth", TENSORS).read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[:-10])
    (tmp_path / "text.pth").write_text("not a pickle at all")
    for name in ("cut.pth", "text.pth"):
        with pytest.raises(GraftlineError, match=rf"{name}: not a readable PyTorch state dict"):
            load_state_dict(tmp_path / name)


def test_lite_blocks_scale_depth_but_not_the_first_and_last_stage():
    assert len(efficientnet_lite.blocks(efficientnet_lite.VARIANTS["efficientnet_lite0"])) == 16
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        found = efficientnet_lite.blocks(efficientnet_lite.VARIANTS[name])
        assert len(found) == 21
        assert found[0][2] == 1 and found[-1][4] == efficientnet_lite.round_filters(320, efficientnet_lite.VARIANTS[name].width)
    lite2 = efficientnet_lite.blocks(efficientnet_lite.VARIANTS["efficientnet_lite2"])
    assert sorted({b[4] for b in lite2}) == [16, 24, 48, 88, 120, 208, 352]  # TensorFlow's rounding of 1.1x widths


@pytest.mark.parametrize("name", list(efficientnet_lite.VARIANTS))
def test_installed_pth_is_the_pinned_file_and_maps_onto_every_layer(name):
    variant = efficientnet_lite.VARIANTS[name]
    pth = efficientnet_lite.installed_pth(name)
    assert sha256_of(pth) == variant.pth_sha256
    state = load_state_dict(pth)
    model = efficientnet_lite.build(name, variant.image_size)
    efficientnet_lite.load_torch_weights(model, name, state, pth)  # every tensor used, every shape right
    assert model.get_layer("block_13_expand").kernel.shape[-1] == model.get_layer("block_13_depthwise").kernel.shape[2]
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), state["_fc.weight"].T)


def test_a_file_of_another_variant_is_named_as_such(tmp_path):
    pth = efficientnet_lite.installed_pth("efficientnet_lite2")
    with pytest.raises(GraftlineError, match="right variant's file"):
        efficientnet_lite.convert("efficientnet_lite0", pth, tmp_path / "x.weights.h5", None)
    with pytest.raises(GraftlineError, match=r"sha256 .* is not efficientnet_lite0's"):
        efficientnet_lite.convert("efficientnet_lite0", pth, tmp_path / "x.weights.h5",
                                  efficientnet_lite.VARIANTS["efficientnet_lite0"].pth_sha256)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """An empty KERAS_HOME: the Lite weights are converted into it from the installed package."""
    with keras_home_set(tmp_path_factory.mktemp("keras")) as home:
        yield home


def test_imagenet_weights_convert_once_into_keras_home(keras_home):
    from components import base_models

    path = Path(base_models.resolve_weights("efficientnet_lite0", 1.0, 224, "imagenet"))
    assert path == keras_home / "models" / "efficientnet_lite0_imagenet.weights.h5"
    stamp = path.stat().st_mtime_ns
    assert base_models.resolve_weights("efficientnet_lite0", 1.0, 160, "imagenet") == str(path)
    assert path.stat().st_mtime_ns == stamp  # reused, not converted again
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []
    # base.weights may name the .pth itself: converted once too, beside the ImageNet file.
    pth = efficientnet_lite.installed_pth("efficientnet_lite0")
    own = Path(base_models.resolve_weights("efficientnet_lite0", 1.0, 224, str(pth)))
    assert own.parent == path.parent and own != path and own.is_file()


def test_converted_lite0_calls_daisies_daisy(keras_home):
    """The weight mapping end to end: Lite0 with its own ImageNet classifier on the daisy photos."""
    require_shared()
    import tensorflow as tf

    from components import base_models, images

    weights = base_models.resolve_weights("efficientnet_lite0", 1.0, 224, "imagenet")
    model = efficientnet_lite.build("efficientnet_lite0", 224)
    model.load_weights(weights)
    photos = sorted((FLOWERS / "daisy").glob("*.jpg"))
    pixels = tf.stack([images.decode_and_resize(tf.io.read_file(str(p)), 224) for p in photos])
    normalised = images.ImagePreprocessing(base_models.REGISTRY["efficientnet_lite0"].preprocessing)(pixels)
    top = model.predict(normalised, batch_size=16, verbose=0).argmax(axis=1)
    assert len(photos) >= 40 and np.mean(top == IMAGENET_DAISY) >= 0.75, np.bincount(top).argsort()[-3:]


PER_CLASS = 16  # photos a class in the small TFX run


@pytest.fixture(scope="module")
def lite_tfx_run(tmp_path_factory):
    """`graftline tfx-run` with base.model: efficientnet_lite0 at 128 px on 16 photos a class, KERAS_HOME empty."""
    require_shared()
    base = tmp_path_factory.mktemp("lite-tfx")
    photos = base / "photos"
    for folder in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        (photos / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(photo, photos / folder.name / photo.name)
    root = base / "project"
    root.mkdir()
    copy_repo(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(photos), sha256="")
    params["base"].update(model="efficientnet_lite0", image_size=128)
    params["train_head"]["epochs"] = 30
    params["fine_tune"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    keras_home = base / "keras"
    env = project_env(keras_home)
    run(["graftline", "tfx-run", "--root", str(base / "tfx")], root, env, base / "tfx-run.log")
    latest = json.loads((base / "tfx" / "latest.json").read_text())
    return {"root": root, "env": env, "keras_home": keras_home, "latest": latest, "photos": photos,
            "artifacts": {k: Path(v) for k, v in latest["artifacts"].items()}}


@pytest.mark.e2e
def test_lite0_tfx_run_caches_by_base_and_fine_tunes_from_activations(lite_tfx_run):
    converted = lite_tfx_run["keras_home"] / "models" / "efficientnet_lite0_imagenet.weights.h5"
    assert converted.is_file()
    caches = sorted(p.name for p in (lite_tfx_run["root"] / "data" / "feature_cache").iterdir())
    assert [c.split("-")[0] for c in caches] == ["activations", "activations", "efficientnet_lite0"], caches
    assert all(c.startswith("activations-efficientnet_lite0-") for c in caches[:2])
    reports = {p.parts[-3]: p for p in (lite_tfx_run["root"].parent / "tfx" / "pipeline").glob("*/report/*")}
    fine_tune = json.loads((reports["FineTune"] / "reports" / "fine_tune.json").read_text())
    assert fine_tune["trained_from"] == "activations" and [b["layers"] for b in fine_tune["bases"]] == [142]
    [cut] = fine_tune["activations"]["bases"]
    assert cut["cut_layer"].startswith("block_") and fine_tune["activations"]["computed"] > 0
    metrics = json.loads((reports["FineTune"] / "metrics" / "fine_tune.json").read_text())
    assert metrics["tflite_float_top1_agreement"] == 1.0 and metrics["tflite_dynamic_range_top1_agreement"] >= 0.8
    # Real ImageNet features: far above the 0.2 of chance, even on this few photos.
    assert lite_tfx_run["latest"]["evaluate"]["accuracy"] >= 0.5, lite_tfx_run["latest"]["evaluate"]


@pytest.mark.e2e
def test_predict_with_the_lite0_model_agrees_with_its_evaluation(lite_tfx_run):
    from components import records

    model_dir = lite_tfx_run["artifacts"]["graftline.Model"] / "artifacts" / "model"
    examples = next(lite_tfx_run["artifacts"]["graftline.Examples"].rglob("examples"))
    keys = [r.key for shard in records.shard_paths(examples, "test") for r in records.read_shard(str(shard))]
    evaluated = (lite_tfx_run["artifacts"]["graftline.Evaluation"] / "plots" / "confusion.csv").read_text()
    out = subprocess.run(["graftline", "predict", "--json", "--model", str(model_dir),
                          *(str(lite_tfx_run["photos"] / key) for key in keys)],
                         cwd=lite_tfx_run["root"], env=lite_tfx_run["env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    predicted = [r["top"][0]["class"] for r in json.loads(out.stdout)]
    assert len(keys) >= 5 and predicted == [row.split(",")[1] for row in evaluated.splitlines()[1:]]


def test_each_lite_base_gets_its_own_size_unless_one_is_given():
    from pipeline import params as params_mod, presets
    from conftest import REPO

    for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260),
                       ("mobilenet_v2", 160)):
        assert params_mod.from_dict({"base": {"model": name}}).base.image_size == size
    assert params_mod.from_dict({"base": {"model": "efficientnet_lite2", "image_size": 200}}).base.image_size == 200
    raw = params_mod.read_yaml((REPO / "params.yaml").read_text())
    lite0 = params_mod.from_dict(presets.merged(raw, presets.load(REPO / "presets", "flowers_lite0")))
    assert (lite0.base.model, lite0.base.image_size, lite0.fine_tune_at) == ("efficientnet_lite0", 224, 100)


@pytest.mark.parametrize("model, name", [("mobilenet_v2", "block_13_expand"), ("efficientnet_lite0", "block_10_expand")])
def test_fine_tune_at_may_name_a_layer_of_the_base(model, name):
    """A layer name opens the same layers as its index; an unknown one fails with the nearest names."""
    from components.backbone import Backbone, networks
    from pipeline import params as params_mod

    by_name = params_mod.from_dict({"fine_tune_at": name, "base": {"model": model, "weights": "none",
                                                                   "image_size": 96}})
    backbone = Backbone.from_params(by_name)
    extractor = backbone.extractor()
    [base] = networks(extractor)
    index = [layer.name for layer in base.layers].index(name)
    assert backbone.fine_tune_indices(extractor, name) == backbone.fine_tune_indices(extractor, index) == [index]
    [opened] = backbone.opening(extractor, name)
    assert opened["trainable_layers"] == len(base.layers) - index and opened["opened_from"] == index
    typo = name.replace("expand", "expnad")
    with pytest.raises(GraftlineError, match=rf"'{typo}' is not a layer of {model}; the nearest names: {name}"):
        backbone.fine_tune_indices(extractor, typo)
    with pytest.raises(GraftlineError, match=r"fine_tune_at = '' is not allowed"):
        params_mod.from_dict({"fine_tune_at": ""})

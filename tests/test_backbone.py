"""The backbone (components/backbone.py): one base or several side by side, every one of them fine-tunable.

The params several bases take; features that are each base's own; ``fine_tune_at`` opening every base (each
base's own index, or a layer name every base has); each base's front at its cut equal to that base's own layers;
training that changes each base's opened layers and nothing below them. Then, with params.yaml as shipped
(three EfficientNet-Lite bases) on 200 sample photos: `dvc repro`, then `dvc exp run -S fine_tune_at=100`
re-running exactly fine_tune and evaluate, the exported bases changed from there up and nowhere below;
predict equal to evaluate; and the same experiment by a layer name. (A killed fine-tune of several bases
resuming to the same metrics: tests/test_resume.py.)
"""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from components import activations, backbone
from components.backbone import Backbone, networks
from components.errors import GraftlineError
from conftest import backbone_of
from pipeline import params as params_mod
from pipeline.params import ParamsError

PAIR = "efficientnet_lite0+mobilenet_v2"
SIZE = 160  # both bases' weights are in the test KERAS_HOME at this size
LAYERS = {"efficientnet_lite0": 142, "efficientnet_lite1": 187, "efficientnet_lite2": 187, "mobilenet_v2": 155}


def test_names_and_sizes_of_several_bases():
    assert backbone.names(PAIR) == ("efficientnet_lite0", "mobilenet_v2")
    assert backbone.names("keras:/a+b.keras") == ("keras:/a+b.keras",)  # a path is one base, '+' and all
    assert backbone.default_size(PAIR) == 224 and backbone.default_size("mobilenet_v2") == 160
    assert backbone.default_size("keras:/a.keras") is None and backbone.default_size("mobilenet_v2+nope") is None
    both = params_mod.from_dict({"base": {"model": PAIR}, "fine_tune_at": 100, "input_block": {"upsample": 2}})
    assert both.base.image_size == 224 and both.fine_tune_at == 100  # fine-tuning and the input block allowed


@pytest.mark.parametrize("base, key, hint", [
    ({"model": PAIR, "weights": "/w.h5"}, "base.weights", "a weights file is one base's"),
    ({"model": "efficientnet_lite0+alexnet"}, "base.weights", "alexnet has no pretrained weights"),
    ({"model": "mobilenet_v2+mobilenet_v2"}, "base.model", "each base named once"),
    ({"model": "efficientnet_lite0+resnet5"}, "base.model", "'resnet5' is not"),
    ({"model": PAIR, "alpha": 0.6}, "base.alpha", "for mobilenet_v2"),
    ({"model": PAIR, "image_size": 31}, "base.image_size", "an integer >= 32"),
    ({"model": PAIR, "feature_layer": "x"}, "base.feature_layer", "keras:<path> bases"),
])
def test_what_several_bases_cannot_take_fails_with_one_line_naming_the_key(base, key, hint):
    with pytest.raises(ParamsError) as failed:
        params_mod.from_dict({"base": base})
    message = str(failed.value)
    assert message.startswith(f"params: {key} = ") and hint in message and "\n" not in message


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """A KERAS_HOME with the shared MobileNetV2 weights (at 160 px); Lite0's are converted into it from the
    installed package."""
    from conftest import keras_home_set, keras_home_with_weights, require_shared

    require_shared()
    home = keras_home_with_weights(tmp_path_factory.mktemp("keras"))
    with keras_home_set(home):
        yield home


@pytest.fixture(scope="module")
def pair(keras_home) -> Backbone:
    return backbone_of(base={"model": PAIR, "image_size": SIZE})


def photos(n: int = 4):
    """``n`` decoded shared daisy photos at SIZE."""
    import tensorflow as tf

    from components import images
    from conftest import FLOWERS

    paths = sorted((FLOWERS / "daisy").glob("*.jpg"))[:n]
    return tf.stack([images.decode_and_resize(tf.io.read_file(str(p)), SIZE) for p in paths]).numpy()


def alone(name: str):
    """(extractor, network) of one base built on its own, as a backbone of one."""
    extractor = backbone_of(base={"model": name, "image_size": SIZE}).extractor()
    return extractor, networks(extractor)[0]


def test_the_features_are_each_base_s_own_side_by_side(pair):
    """Lite0's part equals Lite0's extractor, MobileNetV2's its extractor: each base with its own preprocessing,
    in the order named, nothing trainable until fine-tune opens it; their cache folders."""
    lite_file, mobile_file = (base.weights for base in pair.bases)
    assert lite_file.endswith("efficientnet_lite0_imagenet.weights.h5") and "mobilenet_v2" in mobile_file
    both = pair.extractor()
    assert both.output_shape == (None, 2560) and not both.trainable_weights
    pixels = photos(2)
    got = both.predict(pixels, verbose=0)
    np.testing.assert_allclose(got[:, :1280], alone("efficientnet_lite0")[0].predict(pixels, verbose=0), atol=1e-4)
    np.testing.assert_allclose(got[:, 1280:], alone("mobilenet_v2")[0].predict(pixels, verbose=0), atol=1e-4)
    # The features' cache folder is the pair's own; each base's activations go under its own fingerprint, the one
    # it has alone, so a base's activations serve it alone and beside others.
    lite = backbone_of(base={"model": "efficientnet_lite0", "image_size": SIZE})
    assert pair.fingerprint().startswith(PAIR + "-") and pair.fingerprint() != lite.fingerprint()
    assert pair.base_fingerprints()[0] == lite.fingerprint() != pair.base_fingerprints()[1]


def test_fine_tune_at_opens_every_base_from_its_own_index_or_a_name_every_base_has(pair):
    import keras

    extractor = pair.extractor()
    lite, mobile = networks(extractor)
    assert (len(lite.layers), len(mobile.layers)) == (LAYERS["efficientnet_lite0"], LAYERS["mobilenet_v2"])
    opened = pair.open_from(extractor, 100)
    assert [(o["model"], o["opened_from"], o["trainable_layers"]) for o in opened] == [
        ("efficientnet_lite0", 100, 42), ("mobilenet_v2", 100, 55)]
    for net, described in zip((lite, mobile), opened):
        assert not any(layer.trainable for layer in net.layers[:100])
        assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in net.layers[100:])
        assert described["frozen_batchnorm_layers"] == sum(isinstance(layer, keras.layers.BatchNormalization)
                                                           for layer in net.layers[100:]) > 0
    by_name = pair.fine_tune_indices(extractor, "block_13_expand")  # each base's own block_13_expand
    assert by_name == [[layer.name for layer in net.layers].index("block_13_expand") for net in (lite, mobile)]
    assert by_name[0] != by_name[1]
    with pytest.raises(GraftlineError, match=r"^params: fine_tune_at = 143 is past the end of efficientnet_lite0, "
                                             r"which has 142 layers \(an index is each base's own\)"):
        pair.fine_tune_indices(extractor, 143)
    with pytest.raises(GraftlineError, match=r"^params: fine_tune_at = 'Conv_1' is not a layer of efficientnet_lite0 "
                                             r"\(every base of efficientnet_lite0\+mobilenet_v2 must have it\)"):
        pair.fine_tune_indices(extractor, "Conv_1")  # MobileNetV2's last convolution
    assert [o["trainable_layers"] for o in pair.open_from(extractor, -1)] == [0, 0]
    assert not extractor.trainable_weights


def test_each_base_s_front_at_its_cut_is_that_base_s_own_layers(pair):
    """front's activations equal each base built alone, run to its cut; top of them equals the extractor."""
    import keras

    extractor = pair.extractor()
    front, top, cuts = activations.split(pair, extractor, 100)
    pixels = photos()
    at_cuts = front(pixels)
    assert len(at_cuts) == len(cuts) == 2 and [c.index for c in cuts] == [95, 98]
    for base, cut, got in zip(pair.bases, cuts, at_cuts):
        own_extractor, net = alone(base.name)
        assert net.layers[cut.index - 1].name == cut.layer
        own = keras.Model(net.inputs, net.get_layer(cut.layer).output)
        want = own(own_extractor.get_layer("preprocessing")(pixels))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(top(at_cuts)), np.asarray(extractor(pixels)), atol=1e-4, rtol=1e-4)


def test_training_changes_every_base_s_opened_layers_and_nothing_below(pair, tmp_path):
    """Fine-tuning the pair on images: every opened layer with weights (BatchNorm aside) learns, in both bases;
    no layer below fine_tune_at and no BatchNorm statistic changes."""
    import keras

    from components.head import build_head
    from components.stages import fine_tune

    params = params_mod.from_dict({"base": {"model": PAIR, "image_size": SIZE}, "fine_tune_at": 100})
    model, _ = fine_tune.build_classifier(params, pair, build_head(2560, 3, 0.0))
    before = {(net.name, layer.name): [w.copy() for w in layer.get_weights()]
              for net in networks(model) for layer in net.layers}
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(photos(), np.array([0, 1, 2, 0]), epochs=1, batch_size=2, verbose=0)
    for net in networks(model):
        for i, layer in enumerate(net.layers):
            same = all(np.array_equal(a, b) for a, b in zip(before[(net.name, layer.name)], layer.get_weights()))
            if i < 100 or isinstance(layer, keras.layers.BatchNormalization) or not layer.weights:
                assert same, f"{net.name}/{layer.name} (index {i}) changed"
            else:
                assert not same, f"{net.name}/{layer.name} (index {i}) was opened but did not learn"


# ------------------------------------------------------------------ the default, end to end


PER_CLASS = 40  # of the sample's 80 photos a class: half the cost, test photos enough to judge by


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`dvc repro` with params.yaml as shipped (three frozen EfficientNet-Lite bases), on 40 sample photos a
    class, in a fresh git repo; KERAS_HOME empty, so the Lite weights are converted from the installed packages."""
    import shutil

    import yaml

    from conftest import FLOWERS, copy_repo, project_env, require_shared, run

    require_shared()
    base = tmp_path_factory.mktemp("default")
    photos, root = base / "photos", base / "project"
    for folder in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        (photos / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:PER_CLASS]:
            shutil.copy2(photo, photos / folder.name / photo.name)
    root.mkdir()
    copy_repo(root, recipe=None)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert len(backbone.names(params["base"]["model"])) == 3, "the default is three bases"
    params["data"].update(source=str(photos), sha256="")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(base / "keras")
    for i, cmd in enumerate((["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"],
                             ["dvc", "repro"])):
        run(cmd, root, env, base / f"{i}.log")
    status = run(["dvc", "status"], root, env, base / "status.log")
    return {"root": root, "env": env, "status": status, "params": params, "logs": base, "photos": photos}


def read(root, rel):
    return json.loads((root / rel).read_text())


def experiment(default_run, name: str, *sets: str) -> list[str]:
    """`dvc exp run -S ...` in the default project's workspace; the stages it ran, in order."""
    from conftest import run

    out = run(["dvc", "exp", "run", *(f"-S{s}" for s in sets)], default_run["root"], default_run["env"],
              default_run["logs"] / f"{name}.log")
    return re.findall(r"Running stage '(\w+)'", out)


@pytest.mark.e2e
def test_the_default_runs_whole_with_its_bases_frozen(default_run):
    root = default_run["root"]
    names = backbone.names(default_run["params"]["base"]["model"])
    assert "up to date" in default_run["status"], default_run["status"]  # every output DVC names was written
    bottleneck = read(root, "reports/bottleneck.json")
    assert bottleneck["feature_width"] == 1280 * len(names)
    assert [p.name.split("-")[0] for p in (root / "data" / "feature_cache").iterdir()] == ["+".join(names)]
    head, tuned = read(root, "metrics/train_head.json"), read(root, "metrics/fine_tune.json")
    # Nothing of the bases trains: the exported model is base + head, scored as train_head scored the head.
    assert tuned["trainable_base_layers"] == 0 and tuned["epochs_run"] == 0
    assert tuned["trainable_layers_per_base"] == {name: 0 for name in names}
    assert tuned["val_accuracy"] == pytest.approx(head["val_accuracy"], abs=1e-6)
    # No TFLite by default (export.tflite: []): the SavedModel and the .keras file only.
    assert not [k for k in tuned if k.startswith("tflite_")] and not list((root / "artifacts/model").glob("*.tflite"))
    # ImageNet features of three bases: far above the 0.2 of chance.
    assert read(root, "metrics/evaluate.json")["accuracy"] >= 0.8


@pytest.fixture(scope="module")
def fine_tuned(default_run):
    """The project's headline experiment on the default, `dvc exp run -S fine_tune_at=100`, in one epoch that is
    kept (no early stopping), so that the exported bases are the trained ones."""
    root = default_run["root"]
    ran = experiment(default_run, "exp-100", "fine_tune_at=100", "fine_tune.epochs=1",
                     "fine_tune.early_stopping_patience=0")
    return {"ran": ran, "metrics": read(root, "metrics/fine_tune.json"), "report": read(root, "reports/fine_tune.json")}


@pytest.mark.e2e
def test_fine_tune_at_100_on_the_default_fine_tunes_all_three_bases(default_run, fine_tuned):
    from pathlib import Path

    assert fine_tuned["ran"] == ["fine_tune", "evaluate"]  # nothing before fine_tune re-runs
    metrics, report = fine_tuned["metrics"], fine_tuned["report"]
    names = backbone.names(default_run["params"]["base"]["model"])
    assert metrics["epochs_run"] == 1 and metrics["fine_tune_at"] == 100 and metrics["best_epoch"] is not None
    assert metrics["trainable_layers_per_base"] == {name: LAYERS[name] - 100 for name in names}
    assert metrics["trainable_base_layers"] == sum(LAYERS[name] - 100 for name in names)
    assert report["trained_from"] == "activations" and [b["model"] for b in report["bases"]] == list(names)
    cuts = report["activations"]["bases"]
    assert [c["model"] for c in cuts] == list(names) and all(c["cut_before_layer"] <= 100 for c in cuts)
    assert all(Path(c["cache"]).name.startswith(f"activations-{name}-") for c, name in zip(cuts, names))
    assert report["activations"]["computed"] > 0
    assert read(default_run["root"], "metrics/evaluate.json")["accuracy"] >= 0.8


@pytest.mark.e2e
def test_the_exported_bases_changed_from_fine_tune_at_up_and_nowhere_below(default_run, fine_tuned):
    """The model fine-tune exported against the bases as they come: below fine_tune_at and every BatchNorm
    layer bit for bit the same; above it, in every base, every layer with weights changed."""
    import keras

    import components.images  # noqa: F401  (registers graftline's layers for loading)
    from conftest import keras_home_set

    root = default_run["root"]
    model = keras.saving.load_model(root / "artifacts" / "model" / "model.keras", compile=False)
    with keras_home_set(default_run["env"]["KERAS_HOME"]):
        fresh = Backbone.from_params(params_mod.load(root / "params.yaml")).extractor()
    assert "kept_base_and_head" not in fine_tuned["report"]
    for trained_net, fresh_net in zip(networks(model), networks(fresh), strict=True):
        changed = 0
        for i, (layer, original) in enumerate(zip(trained_net.layers, fresh_net.layers, strict=True)):
            same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), original.get_weights()))
            if i < 100 or isinstance(layer, keras.layers.BatchNormalization) or not layer.weights:
                assert same, f"{trained_net.name}/{layer.name} (index {i}) changed"
            else:
                assert not same, f"{trained_net.name}/{layer.name} (index {i}) did not change"
                changed += 1
        assert changed >= 10, trained_net.name


@pytest.mark.e2e
def test_predict_with_the_fine_tuned_default_agrees_with_its_evaluation(default_run, fine_tuned):
    from components import records

    root = default_run["root"]
    rows = [line.split(",") for line in (root / "plots" / "confusion.csv").read_text().splitlines()[1:]]
    mistakes = {m["path"] for m in read(root, "reports/evaluate.json")["mistakes"]}
    keys = [r.key for shard in records.shard_paths(root / "artifacts" / "examples", "test")
            for r in records.read_shard(str(shard))]
    out = subprocess.run(["graftline", "predict", "--json", "--model", str(root / "artifacts" / "model"),
                          *(str(default_run["photos"] / key) for key in keys)],
                         cwd=root, env=default_run["env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    predicted = [r["top"][0]["class"] for r in json.loads(out.stdout)]
    assert len(keys) >= 20 and predicted == [row[1] for row in rows]
    wrong = {k for k, p in zip(keys, predicted) if k.split("/")[0] != p}
    limit = default_run["params"]["evaluate"]["mistakes"]
    assert mistakes <= wrong and (mistakes == wrong or len(mistakes) == limit)


@pytest.mark.e2e
def test_a_layer_name_fine_tunes_every_base_from_its_own_layer_of_that_name(default_run, fine_tuned):
    """block_11_expand is each base's first layer after the cut made at 100, so every activation is read from the
    cache the experiment above filled."""
    ran = experiment(default_run, "exp-name", "fine_tune_at=block_11_expand", "fine_tune.epochs=1")
    assert ran == ["fine_tune", "evaluate"]
    metrics, report = read(default_run["root"], "metrics/fine_tune.json"), read(default_run["root"],
                                                                                "reports/fine_tune.json")
    assert metrics["epochs_run"] == 1 and metrics["fine_tune_at"] == "block_11_expand"
    opened_from = {b["model"]: b["opened_from"] for b in report["bases"]}
    assert opened_from == {"efficientnet_lite0": 95, "efficientnet_lite1": 96, "efficientnet_lite2": 96}
    assert metrics["trainable_layers_per_base"] == {name: LAYERS[name] - at for name, at in opened_from.items()}
    assert report["activations"]["computed"] == 0  # the same cuts: every base's activations from its cache


def test_weights_folders_may_hold_any_character(keras_home, tmp_path):
    """Each base's file travels on its own, so a KERAS_HOME with ':' (os.pathsep) in its path works."""
    from conftest import keras_home_set

    odd = tmp_path / "keras: home"
    odd.symlink_to(keras_home)
    with keras_home_set(odd):
        both = backbone_of(base={"model": PAIR, "image_size": SIZE})
        assert len(both.bases) == 2 and all(str(odd) in base.weights for base in both.bases)
        assert both.extractor().output_shape == (None, 2560)

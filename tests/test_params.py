"""pipeline/params.py: defaults, the repo's params.yaml, unknown keys and bad values."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from components.errors import GraftlineError
from pipeline import params
from pipeline.params import ParamsError, Params

REPO = Path(__file__).resolve().parents[1]


def test_defaults_load_and_validate():
    p = params.from_dict({})
    assert p == Params()
    assert p.seed == 42 and p.fine_tune_at == -1
    assert p.data.val_percent == 15.0 and p.data.test_percent == 15.0
    assert p.base.model == "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2" and p.base.image_size == 260
    assert p.base.weights == "imagenet" and p.export.tflite == () and p.bottleneck.batch_size == 16
    assert p.train_head.optimizer == "adam" and p.fine_tune.optimizer == "adam" and p.augment.tta == "flip"
    assert p.bottleneck.beam_options == ()
    # None (an empty YAML file) is the defaults too.
    assert params.from_dict(None) == Params()


def test_repo_params_yaml_equals_the_defaults():
    assert Params() == params.load(REPO / "params.yaml")


def test_repo_params_yaml_names_every_key():
    """params.yaml is what `dvc exp run -S` edits and what dvc.yaml declares: every default is spelled there."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = Params().to_dict()
    assert set(raw) == set(expected)
    for section, values in expected.items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section


def test_to_dict_round_trips():
    p = params.from_dict({"seed": 7, "bottleneck": {"beam_options": ["--direct_num_workers=2"]},
                          "data": {"val_percent": 20, "sha256": ""}})
    d = p.to_dict()
    assert d["bottleneck"]["beam_options"] == ["--direct_num_workers=2"]
    assert params.from_dict(d) == p


def test_overrides_are_applied_and_ints_become_floats():
    p = params.from_dict({"data": {"val_percent": 20, "test_percent": 10}, "train_head": {"epochs": 5},
                          "augment": {"flip": False}})
    assert p.data.val_percent == 20.0 and isinstance(p.data.val_percent, float)
    assert p.data.test_percent == 10.0
    assert p.train_head.epochs == 5
    assert p.augment.flip is False
    # Untouched keys of a touched section keep their defaults.
    assert p.train_head.learning_rate == 1e-3 and p.data.shard_size == 1000


def test_params_are_frozen():
    p = params.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, named, suggested",
    [
        ({"train_head": {"epoch": 5}}, "'train_head.epoch'", "'train_head.epochs'"),
        ({"data": {"val_precent": 10}}, "'data.val_precent'", "'data.val_percent'"),
        ({"seeds": 1}, "'seeds'", "'seed'"),
        ({"fine_tune": {"learning_rte": 0.1}}, "'fine_tune.learning_rte'", "'fine_tune.learning_rate'"),
    ],
)
def test_unknown_keys_are_rejected_with_the_dotted_key_and_a_suggestion(raw, named, suggested):
    with pytest.raises(ParamsError) as info:
        params.from_dict(raw)
    message = str(info.value)
    assert f"unknown key {named}" in message, message
    assert f"Did you mean {suggested}?" in message, message


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="unknown key 'trainhead'"):
        params.from_dict({"trainhead": {"epochs": 1}})


@pytest.mark.parametrize(
    "raw, key, value",
    [
        ({"data": {"val_percent": 150}}, "data.val_percent", "150"),
        ({"data": {"val_percent": 0}}, "data.val_percent", "0"),
        ({"data": {"test_percent": -5}}, "data.test_percent", "-5"),
        ({"data": {"val_percent": 60, "test_percent": 40}}, "data.val_percent + data.test_percent", "100"),
        ({"data": {"val_percent": 70, "test_percent": 45}}, "data.val_percent + data.test_percent", "115"),
        ({"train_head": {"epochs": -1}}, "train_head.epochs", "-1"),
        ({"train_head": {"epochs": 0}}, "train_head.epochs", "0"),
        ({"fine_tune": {"epochs": -3}}, "fine_tune.epochs", "-3"),
        ({"fine_tune_at": -2}, "fine_tune_at", "-2"),
        ({"base": {"model": "resnet"}}, "base.model", "'resnet'"),
        ({"train_head": {"optimizer": "adamw"}}, "train_head.optimizer", "'adamw'"),
        ({"fine_tune": {"optimizer": "Adam"}}, "fine_tune.optimizer", "'Adam'"),
        ({"seed": True}, "seed", "True"),
        ({"train_head": {"epochs": True}}, "train_head.epochs", "True"),
        ({"train_head": {"batch_size": 8.0}}, "train_head.batch_size", "8.0"),
        ({"data": {"val_percent": "15"}}, "data.val_percent", "'15'"),
        ({"augment": {"flip": "yes"}}, "augment.flip", "'yes'"),
        ({"data": {"sha256": "abc123"}}, "data.sha256", "'abc123'"),
        ({"data": {"sha256": "A" * 64}}, "data.sha256", "'" + "A" * 64 + "'"),
        ({"data": {"sha256": "g" * 64}}, "data.sha256", "'" + "g" * 64 + "'"),
        ({"data": {"shard_size": 0}}, "data.shard_size", "0"),
        ({"data": {"min_per_class": 0}}, "data.min_per_class", "0"),
        ({"data": {"source": ""}}, "data.source", "''"),
        ({"train_head": {"learning_rate": 0}}, "train_head.learning_rate", "0"),
        ({"fine_tune": {"learning_rate": 1.5}}, "fine_tune.learning_rate", "1.5"),
        ({"train_head": {"dropout": 1.0}}, "train_head.dropout", "1.0"),
        ({"train_head": {"early_stopping_patience": -1}}, "train_head.early_stopping_patience", "-1"),
        ({"fine_tune": {"batch_size": 0}}, "fine_tune.batch_size", "0"),
        ({"bottleneck": {"batch_size": -4}}, "bottleneck.batch_size", "-4"),
        ({"bottleneck": {"beam_options": "--direct_num_workers=2"}}, "bottleneck.beam_options", "'--direct_num_workers=2'"),
        ({"bottleneck": {"runner": ""}}, "bottleneck.runner", "''"),
        ({"augment": {"rotation": 1.5}}, "augment.rotation", "1.5"),
        ({"augment": {"zoom": 1}}, "augment.zoom", "1"),
        ({"base": {"weights": ""}}, "base.weights", "''"),
        ({"data": 5}, "data", "5"),
    ],
)
def test_bad_values_raise_params_error_naming_key_and_value(raw, key, value):
    with pytest.raises(ParamsError) as info:
        params.from_dict(raw)
    message = str(info.value)
    assert key in message, message
    assert value in message, message
    assert "expected" in message, message  # and what is allowed


def test_good_edge_values_are_accepted():
    p = params.from_dict({
        "fine_tune_at": -1,
        "fine_tune": {"epochs": 0},
        "train_head": {"early_stopping_patience": 0, "dropout": 0},
        "data": {"sha256": "", "val_percent": 49.5, "test_percent": 50},
        "bottleneck": {"beam_options": None},
        "base": {"model": "vgg16", "image_size": 64, "weights": "none"},
    })
    assert p.fine_tune_at == -1 and p.fine_tune.epochs == 0
    assert p.bottleneck.beam_options == ()
    assert p.base.model == "vgg16"


@pytest.mark.parametrize(
    "raw, key, value",
    [
        ({"base": {"model": "mobilenet_v2", "alpha": 0.4}}, "base.alpha", "0.4"),
        ({"base": {"image_size": 16}}, "base.image_size", "16"),
        ({"base": {"model": "inception_v3", "image_size": 64}}, "base.image_size", "64"),
    ],
)
def test_base_model_constraints_name_key_and_value(raw, key, value):
    with pytest.raises(GraftlineError) as info:
        params.from_dict(raw)
    assert key in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("raw", [{"base": {"model": "mobilenet_v2", "alpha": 0.4}}, {"base": {"image_size": 16}}])
def test_base_model_constraints_raise_params_error(raw):
    with pytest.raises(ParamsError):
        params.from_dict(raw)


def test_load_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        params.load(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(bad)


def test_load_rejects_unknown_key_in_file(tmp_path):
    path = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train_head"]["epoch"] = 5
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train_head\.epoch\b.*train_head\.epochs"):
        params.load(path)


def test_exponent_floats_as_dvc_writes_them_load_as_numbers(tmp_path):
    """`dvc exp run -S fine_tune.learning_rate=1e-5` writes 1e-05 (YAML 1.2); YAML 1.1 would read a string."""
    (tmp_path / "params.yaml").write_text("fine_tune:\n  learning_rate: 1e-05\ntrain_head:\n  learning_rate: 3E-4\n")
    loaded = params.load(tmp_path / "params.yaml")
    assert loaded.fine_tune.learning_rate == 1e-5 and loaded.train_head.learning_rate == 3e-4


def test_readme_params_table_is_the_one_params_py_generates():
    """docs/params.md holds the table (the README links it)."""
    text = params.TABLE_PAGE.read_text()
    assert params.README_BEGIN in text and params.README_END in text
    assert params.readme_with_table(text) == text, "docs/params.md's params table drifted: run python -m pipeline.params --readme"
    rows = params.table_rows()
    # one row per leaf key, each with its help text
    leaves = []
    for name, value in params.Params().to_dict().items():
        leaves += [f"`{name}.{key}`" for key in value] if isinstance(value, dict) else [f"`{name}`"]
    assert [key for key, _, _ in rows] == leaves
    assert all(text.strip() for _, _, text in rows)


def test_a_rule_lives_next_to_its_field_and_is_checked_for_yaml_values():
    # The rule is the field's metadata; a value from YAML that breaks it fails with that field's key.
    rule = {f.name: f.metadata for f in dataclasses.fields(params.DataParams)}["shard_size"]
    assert rule["allowed"] == "an integer >= 1" and not rule["ok"](0) and rule["ok"](1)
    with pytest.raises(ParamsError, match=r"data.shard_size = 0 is not allowed; expected an integer >= 1"):
        params.from_dict({"data": {"shard_size": 0}})

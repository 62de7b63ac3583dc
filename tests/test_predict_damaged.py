"""`graftline predict --model DIR` on a damaged or incomplete model folder: exit 2 with one line naming the
folder and what is wrong, never a traceback.

Each test copies the session pipeline's exported model (conftest's ``project``: the real `dvc repro`) and
damages the copy in one way; the first test shows that the undamaged copy predicts, so each failure below
is the damage's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FLOWERS

pytestmark = pytest.mark.e2e

SHARDS = "saved_model/variables/variables.data-*"
# DVC asks before it overwrites a changed file (and a run without a terminal stops there): --force.
REEXPORT = "restore it (`dvc checkout --force {}`) or export it again (`dvc repro fine_tune`)"


def photo() -> Path:
    return sorted((FLOWERS / "daisy").glob("*.jpg"))[0]


@pytest.fixture
def model(project, tmp_path) -> Path:
    """A copy of the pipeline's exported model folder, for one test to damage."""
    copy = tmp_path / "model"
    shutil.copytree(project.root / "artifacts" / "model", copy)
    return copy


def predict(model: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["graftline", "predict", "--model", str(model), str(photo())], cwd=model.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def the_one_line(result: subprocess.CompletedProcess, model: Path) -> str:
    """Exit 2, nothing predicted, and stderr exactly one line: the error, naming the folder."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"graftline predict: error: {model}: "), lines[0]
    return lines[0]


def shard(model: Path) -> Path:
    [path] = sorted(model.glob(SHARDS))  # one shard: what export writes on one device
    return path


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_the_undamaged_copy_predicts(model, project):
    result = predict(model, project.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{photo()}: "), result.stdout


def test_variables_shard_cut_in_half(model, project):
    data = shard(model)
    cut(data, data.stat().st_size // 2)
    line = the_one_line(predict(model, project.env), model)
    assert f"saved_model/variables/{data.name} is cut short or damaged (Read less bytes than requested)" in line
    assert line.endswith(REEXPORT.format(model)), line


def test_variables_shard_one_byte_short(model, project):
    data = shard(model)
    cut(data, data.stat().st_size - 1)
    line = the_one_line(predict(model, project.env), model)
    assert f"saved_model/variables/{data.name} is cut short or damaged" in line, line


def test_variables_shard_with_flipped_bytes(model, project):
    data = shard(model)
    content = bytearray(data.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 4] = bytes(b ^ 0xFF for b in content[middle:middle + 4])
    data.write_bytes(bytes(content))
    line = the_one_line(predict(model, project.env), model)
    assert f"saved_model/variables/{data.name} is cut short or damaged (Checksum does not match" in line, line


def test_variables_shard_missing(model, project):
    data = shard(model)
    data.unlink()
    line = the_one_line(predict(model, project.env), model)
    assert f"incomplete model folder, saved_model/variables/{data.name} (the weights) missing" in line, line


def test_saved_model_pb_missing(model, project):
    (model / "saved_model" / "saved_model.pb").unlink()
    line = the_one_line(predict(model, project.env), model)
    assert "incomplete model folder, saved_model/saved_model.pb missing; " + REEXPORT.format(model) in line, line


def test_saved_model_pb_cut_short(model, project):
    graph = model / "saved_model" / "saved_model.pb"
    cut(graph, graph.stat().st_size // 2)
    line = the_one_line(predict(model, project.env), model)
    assert "saved_model/saved_model.pb is damaged or cut short (not a SavedModel protobuf)" in line, line


def test_variables_index_missing(model, project):
    (model / "saved_model" / "variables" / "variables.index").unlink()
    line = the_one_line(predict(model, project.env), model)
    assert "incomplete model folder, saved_model/variables/variables.index missing" in line, line


def test_variables_index_cut_short(model, project):
    index = model / "saved_model" / "variables" / "variables.index"
    cut(index, index.stat().st_size // 2)
    line = the_one_line(predict(model, project.env), model)
    assert "saved_model/variables/variables.index is damaged or cut short" in line, line


def test_variables_folder_missing(model, project):
    shutil.rmtree(model / "saved_model" / "variables")
    line = the_one_line(predict(model, project.env), model)
    assert "saved_model/variables/variables.index and saved_model/variables/variables.data-" in line, line


def test_saved_model_folder_missing(model, project):
    shutil.rmtree(model / "saved_model")
    line = the_one_line(predict(model, project.env), model)
    assert "incomplete model folder, saved_model/ missing" in line, line


def test_labels_json_missing(model, project):
    (model / "labels.json").unlink()
    line = the_one_line(predict(model, project.env), model)
    assert "incomplete model folder, labels.json missing; " + REEXPORT.format(model) in line, line


def test_labels_json_not_json(model, project):
    labels = model / "labels.json"
    cut(labels, labels.stat().st_size // 2)  # a write cut short: '[\n  "daisy",\n  "dand'
    line = the_one_line(predict(model, project.env), model)
    assert "labels.json is not valid JSON (" in line, line


def test_labels_json_not_a_list_of_names(model, project):
    labels = json.loads((model / "labels.json").read_text())
    (model / "labels.json").write_text(json.dumps({name: i for i, name in enumerate(labels)}))
    line = the_one_line(predict(model, project.env), model)
    assert "labels.json is not a list of class names (one per model output)" in line, line


@pytest.mark.parametrize("change", [-1, 1], ids=["one-class-fewer", "one-class-more"])
def test_labels_json_count_differs_from_the_models_outputs(model, project, change):
    labels = json.loads((model / "labels.json").read_text())
    named = labels[:change] if change < 0 else labels + ["extra"]
    (model / "labels.json").write_text(json.dumps(named))
    line = the_one_line(predict(model, project.env), model)
    assert (f"labels.json names {len(named)} classes but the model outputs {len(labels)} class probabilities: "
            "they are from different exports") in line, line


def test_empty_model_folder(model, project):
    shutil.rmtree(model)
    model.mkdir()
    line = the_one_line(predict(model, project.env), model)
    assert line.endswith(f"{model}: the model folder is empty; run the pipeline (fine-tune exports it)"), line

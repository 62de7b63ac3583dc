"""The first hour's mistakes: each one clear line (exit 2) naming the file, URL, key or command, and
nothing left behind after a SIGTERM or by a dead process (tests/test_crash.py kills every stage at many moments)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import fetch
from components.errors import GraftlineError
from conftest import TENSORFLOW_NOT_LOADED, cli_probe
from drawing import make_class_tree, make_tar, tree_members
from loopback import serve

BIN = Path(sys.executable).parent


def env(**extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def graftline(args: list[str], cwd: Path, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["graftline", *args], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith(f"graftline {command}: error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def small_project(folder: Path, **params) -> Path:
    """Drawn photos of three classes; MobileNetV2 alpha 0.35 at 96 px with random weights (no download)."""
    make_class_tree(folder / "photos", {"cats": 30, "dogs": 30, "owls": 30}, size=(96, 96))
    settings = {
        "data": {"source": str(folder / "photos"), "sha256": "", "val_percent": 20, "test_percent": 20},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": 96, "weights": "none"},
        "fine_tune_at": 100,
        "train_head": {"epochs": 3},
        "fine_tune": {"epochs": 2, "batch_size": 8, "early_stopping_patience": 0},
        "export": {"tflite": []},
    }
    for section, values in params.items():
        settings.setdefault(section, {}).update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(settings))
    return folder


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary folders and files a stage writes beside its outputs (".<name>.tmp-*")."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp-*"))


# ------------------------------------------------------------------ 1. a misspelled key


@pytest.mark.e2e
def test_an_unknown_key_fails_the_next_dvc_repro_when_no_stage_changed(project, tmp_path):
    from test_ci_evaluate import copy_project

    root = copy_project(project, tmp_path / "project")
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params + "fine_tun_at: 120\n")  # what `dvc exp run -S +fine_tun_at=120` adds
    result = subprocess.run(["dvc", "repro"], cwd=root, env=project.env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # evaluate depends on all of params.yaml: the one stage that runs, and its command fails first thing
    assert re.findall(r"Running stage '(\w+)'", output) == ["evaluate"], output
    assert "params: unknown key 'fine_tun_at'. Did you mean 'fine_tune_at'?" in output, output
    assert "Traceback" not in output


# ------------------------------------------------------------------ 2. kills


def test_sigterm_during_ingest_is_one_line_and_leaves_nothing(tmp_path):
    from crash import HOOK

    root = small_project(tmp_path)
    # SIGTERM just before ingest opens its first shard (tests/crash_hook): the same moment on any machine, under load
    crash = f"ingest|open|artifacts/.examples.tmp-*/*/*|1|TERM|stage|{tmp_path / 'fired'}"
    result = graftline(["ingest"], root, PYTHONPATH=str(HOOK), GRAFTLINE_CRASH=crash)
    assert (tmp_path / "fired").is_file(), result.stderr
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("graftline ingest: interrupted by SIGTERM"), result.stderr
    assert hidden_leftovers(root) == [] and not (root / "artifacts" / "examples").exists()


# ------------------------------------------------------------------ 3. corrupt archives


@pytest.mark.parametrize("name, content", [
    ("photos.tgz", b"this is not a gzip file\n"),
    ("photos.zip", b"PK\x03\x04 not really a zip\n"),
    ("photos.tar.gz", None),  # a real archive cut short
], ids=["text-as-tgz", "text-as-zip", "truncated-tgz"])
def test_a_corrupt_or_truncated_archive_is_one_line(tmp_path, name, content):
    archive = tmp_path / name
    if content is None:
        tree = make_class_tree(tmp_path / "drawn", {"cats": 6, "dogs": 6}, size=(64, 64))
        whole = make_tar(tmp_path / "whole.tgz", tree_members(tree, "photos/")).read_bytes()
        content = whole[: len(whole) // 2]
    archive.write_bytes(content)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(archive), "sha256": ""}}))
    line = one_line_error(graftline(["ingest"], tmp_path), "ingest", str(archive))
    assert "corrupt or incomplete" in line and "data.sha256" in line
    assert not [p for p in (tmp_path / "data" / "raw").glob("*") if p.is_dir()]  # nothing half-extracted kept


# ------------------------------------------------------------------ 4. stages out of order


@pytest.mark.parametrize("stage, missing, first", [
    ("train-head", "artifacts/bottlenecks", "ingest"),
    ("fine-tune", "artifacts/examples", "ingest"),
    ("evaluate", "artifacts/examples", "ingest"),
])
def test_a_stage_before_the_ones_it_needs_names_the_file_and_the_stage(tmp_path, stage, missing, first):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({}))
    result = graftline([stage], tmp_path, timeout=120)
    one_line_error(result, stage, missing, f"graftline {first}", "dvc repro")


def test_train_head_after_ingest_only_names_the_bottleneck(tmp_path):
    root = small_project(tmp_path)
    assert graftline(["ingest"], root).returncode == 0
    line = one_line_error(graftline(["train-head"], root, timeout=120), "train-head", "artifacts/bottlenecks",
                          "run `graftline bottleneck` first")
    assert "ingest" not in line


# ------------------------------------------------------------------ 5. download failures


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_http_404_says_not_found(tmp_path, no_proxy):
    server = serve(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/nothing.tgz"
        with pytest.raises(GraftlineError) as info:
            fetch.fetch(url, tmp_path / "d" / "x.tgz", what="data.url")
    finally:
        server.shutdown()
    message = str(info.value)
    assert url in message and "not found (HTTP 404)" in message and "offline" not in message
    assert "data.url" in message


def test_a_refused_connection_says_refused(tmp_path, no_proxy):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/photos.tgz"
    with pytest.raises(GraftlineError) as info:
        fetch.fetch(url, tmp_path / "x.tgz", what="data.url")
    assert url in str(info.value) and "refused" in str(info.value) and "offline" not in str(info.value)


def test_a_silent_server_says_timed_out(tmp_path, no_proxy, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT_S", 1)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/photos.tgz"
        with pytest.raises(GraftlineError) as info:
            fetch.fetch(url, tmp_path / "x.tgz", what="data.url")
    finally:
        listener.close()
    assert url in str(info.value) and "timed out after 1 s" in str(info.value)


def test_an_unknown_host_says_no_network_or_no_such_host(tmp_path, no_proxy):
    url = "http://graftline-test.invalid/photos.tgz"  # .invalid never resolves (RFC 2606)
    with pytest.raises(GraftlineError) as info:
        fetch.fetch(url, tmp_path / "x.tgz", what="data.url", offline_hint="Use a local folder.")
    message = str(info.value)
    assert url in message and "cannot resolve graftline-test.invalid" in message and "Use a local folder." in message


# ------------------------------------------------------------------ 6. predict with nothing to predict


@pytest.mark.e2e
def test_predict_with_nothing_to_predict_is_non_zero_with_the_reason(project, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a photo\n")
    model = str(project.root / "artifacts" / "model")
    # With no photo, neither TensorFlow nor the model is loaded.
    def predict(target: str) -> subprocess.CompletedProcess:
        return cli_probe(["predict", "--model", model, target], tmp_path, project.env)

    empty = predict(str(tmp_path / "empty"))
    one_line_error(empty, "predict", str(tmp_path / "empty"), "no files")
    text = predict(str(tmp_path / "notes.txt"))
    line = one_line_error(text, "predict", "nothing was predicted", "1 file")
    assert f"{tmp_path / 'notes.txt'}: skipped (not an image)" in text.stdout, line
    assert empty.stdout.splitlines()[-1] == text.stdout.splitlines()[-1] == TENSORFLOW_NOT_LOADED


@pytest.mark.e2e
def test_predict_skips_a_photo_above_the_projects_max_pixels_from_its_header(project, tmp_path):
    from drawing import draw_photo

    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["data"]["max_pixels"] = 1000
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    draw_photo(tmp_path / "wide.jpg", (200, 40, 40), (41, 25), seed=1)
    result = cli_probe(["predict", "--model", str(project.root / "artifacts" / "model"), str(tmp_path / "wide.jpg")],
                       tmp_path, project.env)  # in tmp_path: its params.yaml is the project's
    one_line_error(result, "predict", "nothing was predicted")
    assert f"{tmp_path / 'wide.jpg'}: skipped (41x25 pixels (0.0 MP) is above data.max_pixels = 1000" in result.stdout
    assert result.stdout.splitlines()[-1] == TENSORFLOW_NOT_LOADED


# ------------------------------------------------------------------ 7. smaller ones


def test_an_archive_with_one_class_says_one_class_folder(tmp_path):
    tree = make_class_tree(tmp_path / "drawn", {"cats": 6}, size=(64, 64))
    archive = make_tar(tmp_path / "photos.tgz", tree_members(tree, "photos/"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(archive), "sha256": ""}}))
    one_line_error(graftline(["ingest"], tmp_path), "ingest", "has 1 class folder(s)", "at least 2")


def test_the_digits_preset_before_pretrain_digits_names_the_command(tmp_path):
    from conftest import copy_repo

    copy_repo(tmp_path)
    applied = graftline(["preset", "digits"], tmp_path, timeout=120)
    assert applied.returncode == 0 and "graftline pretrain-digits" in applied.stdout, applied.stdout
    one_line_error(graftline(["ingest"], tmp_path, timeout=120), "ingest", "data/digits/digits_5_9",
                   "graftline pretrain-digits")


def test_ingest_says_what_it_skipped_duplicated_and_refused(tmp_path):
    import shutil

    root = small_project(tmp_path)
    (root / "photos" / "cats" / "notes.txt").write_text("not a photo\n")
    shutil.copy(root / "photos" / "cats" / "cats_001.jpg", root / "photos" / "cats" / "zz_copy.jpg")
    shutil.copy(root / "photos" / "dogs" / "dogs_001.jpg", root / "photos" / "cats" / "zz_dog.jpg")
    result = graftline(["ingest"], root)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout.split("done ", 1)[1])
    assert (done["num_skipped"], done["num_duplicates"], done["num_label_conflicts"]) == (1, 1, 1)


def test_the_gate_names_what_a_missing_baseline_is(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.9}))
    line = one_line_error(graftline(["gate", "--baseline", "main.json"], tmp_path, timeout=60), "gate",
                          "--baseline main.json not found", "git show main:metrics/evaluate.json")
    assert "run the evaluate stage" not in line
    (tmp_path / "metrics" / "evaluate.json").unlink()
    one_line_error(graftline(["gate"], tmp_path, timeout=60), "gate", "--current metrics/evaluate.json not found",
                   "dvc repro evaluate")

"""The console script's errors: one clear line, exit code 2, within seconds, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from drawing import make_class_tree

BIN = Path(sys.executable).parent
# An address that refuses connections at once: "offline" on any machine, with no code hook.
DEAD_PROXY = "http://127.0.0.1:9"


def graftline(args: list[str], cwd: Path, **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env_extra}
    started = time.time()
    result = subprocess.run(["graftline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result, time.time() - started


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def assert_one_line_error(result: subprocess.CompletedProcess, stage: str, *words: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith(f"graftline {stage}: error:"))
    for word in words:
        assert word in line, line
    return line


def test_offline_url_source_stops_in_seconds_with_how_to_use_a_folder(tmp_path):
    write_params(tmp_path, {"data": {"source": "http://download.tensorflow.org/example_images/flower_photos.tgz"}})
    result, elapsed = graftline(["ingest"], tmp_path, http_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY)
    assert_one_line_error(result, "ingest", "offline", "data.source", "/path/to/photos")
    assert elapsed < 30
    assert not (tmp_path / "artifacts").exists() and not list((tmp_path / "data" / "raw").glob("*.tgz"))


def test_unknown_param_key_is_named_before_any_work(tmp_path):
    write_params(tmp_path, {"train_head": {"epoch": 5}})
    result, _ = graftline(["ingest"], tmp_path)
    assert_one_line_error(result, "ingest", "train_head.epoch", "train_head.epochs")


def test_missing_imagenet_weights_offline_names_file_folder_and_alternative(tmp_path):
    make_class_tree(tmp_path / "photos", {"cats": 12, "dogs": 12})
    write_params(tmp_path, {"data": {"source": str(tmp_path / "photos"), "sha256": "",
                                     "val_percent": 30, "test_percent": 30}})
    result, _ = graftline(["ingest"], tmp_path)
    assert result.returncode == 0, result.stderr
    keras_home = tmp_path / "keras-home"
    result, elapsed = graftline(["bottleneck"], tmp_path, KERAS_HOME=str(keras_home),
                                https_proxy=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY)
    assert_one_line_error(result, "bottleneck", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5",
                          str(keras_home / "models"), "base.weights")
    assert elapsed < 60  # TensorFlow's import is most of it
    assert not (tmp_path / "artifacts" / "bottlenecks").exists()

"""The console script's errors: one clear line, exit code 2, within seconds, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import TENSORFLOW_NOT_LOADED, cli_probe
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
    write_params(tmp_path, {})  # the defaults: data.url downloaded to data/download/flower_photos.tgz
    result, elapsed = graftline(["download"], tmp_path, http_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY)
    assert_one_line_error(result, "download", "refused", "data.url", "data.source", "/path/to/photos")
    assert elapsed < 30
    assert not list((tmp_path / "data" / "download").iterdir())  # no partial download left behind


def test_a_url_in_data_source_says_to_use_data_url(tmp_path):
    write_params(tmp_path, {"data": {"source": "https://example.org/photos/flowers.zip"}})
    result, _ = graftline(["ingest"], tmp_path)
    assert_one_line_error(result, "ingest", "data.source", "data.url", "data/download/flowers.zip")


def test_unknown_param_key_is_named_before_any_work(tmp_path):
    write_params(tmp_path, {"train_head": {"epoch": 5}})
    result, _ = graftline(["ingest"], tmp_path)
    assert_one_line_error(result, "ingest", "train_head.epoch", "train_head.epochs")


def test_missing_imagenet_weights_offline_names_file_folder_and_alternative(tmp_path):
    make_class_tree(tmp_path / "photos", {"cats": 12, "dogs": 12})
    write_params(tmp_path, {"data": {"source": str(tmp_path / "photos"), "sha256": "",
                                     "val_percent": 30, "test_percent": 30},
                            "base": {"model": "mobilenet_v2"}, "fine_tune_at": 100})
    result, _ = graftline(["ingest"], tmp_path)
    assert result.returncode == 0, result.stderr
    keras_home = tmp_path / "keras-home"
    result, elapsed = graftline(["bottleneck"], tmp_path, KERAS_HOME=str(keras_home),
                                https_proxy=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY)
    assert_one_line_error(result, "bottleneck", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5",
                          str(keras_home / "models"), "base.weights")
    assert elapsed < 60  # TensorFlow's import is most of it
    assert not (tmp_path / "artifacts" / "bottlenecks").exists()


def test_a_stage_prints_no_native_log_lines_unless_asked(tmp_path):
    """TensorFlow's C++ lines (I/W/E with timestamps) and absl's preamble stay off the console."""
    from pipeline import console

    write_params(tmp_path, {})

    def native_lines(stderr: str) -> list[str]:
        return [line for line in stderr.replace("\r", "\n").splitlines() if console.is_native(line.encode())]

    # `graftline devices` imports TensorFlow and sets it up as train-head and fine-tune do.
    quiet, _ = graftline(["devices"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert native_lines(quiet.stderr) == [] and "absl" not in quiet.stderr, quiet.stderr
    assert quiet.stdout.startswith("graftline devices: done")
    verbose, _ = graftline(["devices"], tmp_path, GRAFTLINE_VERBOSE="1")
    assert verbose.returncode == 0 and native_lines(verbose.stderr), verbose.stderr  # what the filter hides


def test_ingest_runs_without_tensorflow(tmp_path):
    """Ingest writes the TFRecords with the protobuf library and Beam's framing: no TensorFlow import."""
    make_class_tree(tmp_path / "photos", {"cats": 8, "dogs": 8})
    write_params(tmp_path, {"data": {"source": str(tmp_path / "photos"), "sha256": "",
                                     "val_percent": 30, "test_percent": 30}})
    result = cli_probe(["ingest"], tmp_path, {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                       timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == TENSORFLOW_NOT_LOADED
    assert "ingest: writing TFRecords" in result.stderr  # the progress bars come through
    assert (tmp_path / "artifacts" / "examples").is_dir()


def test_the_console_filter_passes_progress_bars_on_at_once(tmp_path):
    import os
    import threading

    from pipeline import console

    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    thread = threading.Thread(target=console._forward, args=(read_end, out_write))
    thread.start()
    os.write(write_end, b"\ringest: 10%|#")  # a bar redrawn without a newline...
    import select

    assert select.select([out_read], [], [], 5)[0], "a progress bar was held back"
    first = os.read(out_read, 100)  # ...arrives while the writer still holds the line open
    os.write(write_end, b"\ringest: 50%|###\n"
             b"I0000 00:00:1796142435.055946   13805 port.cc:153] oneDNN custom operations are on.\n"
             b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"E0000 00:00:1796142438.267132   13805 cuda_platform.cc:52] failed call to cuInit\n"
             b"Epoch 1/10\nE")
    os.write(write_end, b"0000 00:00:1.2 1 a.cc:3] split across writes\nwarning: a real one\n")
    os.close(write_end)
    thread.join(5)
    os.close(out_write)
    rest = b""
    while chunk := os.read(out_read, 1000):
        rest += chunk
    assert first == b"\ringest: 10%|#"
    assert rest == b"\ringest: 50%|###\nEpoch 1/10\nwarning: a real one\n"


def test_the_reason_a_stage_stopped_starts_a_line_of_its_own(capsys):
    """A signal landing while a progress bar is being made leaves that bar open (its ``with`` never entered):
    the one-line reason must not be glued to it (seen with SIGTERM at the start of ingest's TFRecord bar)."""
    from tqdm import tqdm

    from pipeline import console

    bar = tqdm(total=490, desc="ingest: writing TFRecords", unit="photo")  # made, never closed (held: not collected)
    console.end_progress_bars()
    print("graftline ingest: interrupted by SIGTERM; no output was half-written.", file=sys.stderr)
    err = capsys.readouterr().err
    assert "ingest: writing TFRecords:   0%" in err
    assert err.splitlines()[-1] == "graftline ingest: interrupted by SIGTERM; no output was half-written."
    assert bar.disable  # closed

"""Crash consistency: a stage killed at many moments, then one `dvc repro`, recovers to the uninterrupted run's
metrics with nothing left behind (tests/crash.py, the harness; benchmarks/crash.py runs more points); and the
pieces that make it so, each on its own."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crash import After, Appears, KillPoint, Write, make_project


# ------------------------------------------------------------------ what a dead process left


def zombie() -> int:
    """A child killed and never waited for: a zombie, as a stage killed with its `dvc repro` stays where PID 1
    does not reap (kill(pid, 0) still succeeds on it)."""
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)"], os.environ)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.01)
    return pid


def test_what_a_dead_or_zombie_process_left_is_removed_and_a_live_writers_kept(tmp_path):
    from components import atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.tmp-{dead.pid}-def").write_text("what a SIGKILLed run leaves")
    pid = zombie()
    try:
        (tmp_path / f".out.tmp-{pid}-abc").mkdir()
        (tmp_path / f".out.tmp-{pid}-abc" / "half").write_text("x")
        (tmp_path / f".out.tmp-{os.getppid()}-xyz").mkdir()  # another run, still writing
        with atomic.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", f".out.tmp-{os.getppid()}-xyz"])
    finally:
        os.waitpid(pid, 0)


def test_a_pid_taken_by_a_later_process_is_not_the_writer(tmp_path):
    from components import atomic

    leftover = tmp_path / f".out.tmp-{os.getppid()}-abc"
    leftover.write_text("x")
    assert not atomic.left_by_a_dead_process(leftover)  # our parent started before it: it may be writing it
    assert atomic._alive(os.getppid(), time.time())
    assert not atomic._alive(os.getpid(), time.time() - 3600)  # started after that moment: someone else


def test_a_cache_entry_a_dead_process_was_writing_is_removed_when_the_cache_opens(tmp_path):
    from components import vector_cache
    from components.vector_cache import VectorCache

    cache = VectorCache(str(tmp_path), "features", (4,))
    cache.put("ab" + "0" * 62, np.arange(4, dtype=np.float32))
    sub = tmp_path / "features" / "ab"
    pid = zombie()
    try:
        dead = sub / f".{'ab' + '1' * 62}.f32.tmp-{pid}-{vector_cache.HOST}-0123"
        live = sub / f".{'ab' + '2' * 62}.f32.tmp-{os.getppid()}-{vector_cache.HOST}-4567"
        elsewhere = sub / f".{'ab' + '3' * 62}.f32.tmp-{pid}-another_machine-89ab"
        for path in (dead, live, elsewhere):
            path.write_bytes(b"half an entry")
        vector_cache._swept.clear()  # a new process
        reopened = VectorCache(str(tmp_path), "features", (4,))
        assert sorted(p.name for p in sub.iterdir()) == sorted([f"{'ab' + '0' * 62}.f32", live.name, elsewhere.name])
        assert reopened.get("ab" + "0" * 62)[0].tolist() == [0, 1, 2, 3]
    finally:
        os.waitpid(pid, 0)


# ------------------------------------------------------------------ two runs at once


def test_a_second_run_of_a_stage_is_refused_with_one_line_naming_the_first(tmp_path):
    from components import atomic
    from conftest import BIN

    (tmp_path / "params.yaml").write_text("data:\n  source: photos\n  sha256: ''\n")  # nothing to download
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["graftline", "download"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)

    with atomic.one_at_a_time(tmp_path / "data" / "checkpoints" / "download.lock", "graftline download"):
        refused = download()
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"graftline download: error: graftline download is already running in this project (pid {os.getpid()}; "
        f"data/checkpoints/download.lock is locked): wait for it to end, or stop it"], refused.stderr
    assert download().returncode == 0  # the lock goes with the process that held it


# ------------------------------------------------------------------ the harness: kill, `dvc repro`, compare

# A handful per stage, at the moments that matter most (benchmarks/crash.py tries many more). "group": `dvc repro`
# killed with its stage (a cancelled CI job, a closed terminal): the stage is left a zombie where PID 1 does not
# reap. INT to the group is a terminal's Ctrl-C.
POINTS = [
    KillPoint("download", Appears("data/download/.photos.tar.gz.tmp-*"), "KILL", "group"),  # a partial archive
    KillPoint("ingest", Write("open", "artifacts/.examples.tmp-*/*/*"), "TERM"),  # the first shard
    # SIGTERM while Beam's step writes a cache entry: Beam re-raises it with the step's name appended
    KillPoint("bottleneck", Write("os.rename", "data/feature_cache/*", 10), "TERM", cold_cache="mobilenet_v2-*"),
    KillPoint("bottleneck", Write("os.rename", "artifacts/bottlenecks"), "INT", "group"),  # putting the set in place
    KillPoint("audit", Write("open", "reports/.audit.html.tmp-*/*"), "TERM"),
    KillPoint("train_head", After(0.6), "KILL"),
    KillPoint("fine_tune", Write("os.rename", "data/checkpoints/fine_tune/epoch-0002"), "KILL", "group"),
    KillPoint("fine_tune", Write("os.mkdir", "artifacts/.model.tmp-*"), "TERM"),  # the export
    KillPoint("evaluate", Write("open", "metrics/.evaluate.json.tmp-*/*"), "KILL", "group"),
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from conftest import require_shared

    require_shared()
    harness, server = make_project(tmp_path_factory.mktemp("crash"))
    harness.run_reference()
    yield harness
    server.shutdown()


@pytest.mark.e2e
@pytest.mark.parametrize("point", POINTS, ids=str)
def test_one_dvc_repro_recovers_from_a_kill_to_the_same_metrics_with_nothing_left(harness, point):
    outcome = harness.kill(point)
    assert outcome.reached, f"{point}: the stage ended before the moment came"
    assert outcome.problems == [], outcome.problems


@pytest.mark.e2e
def test_a_second_dvc_repro_while_one_runs_is_refused_and_harms_nothing(harness):
    from crash import stage_process

    harness.touch("evaluate")
    first = subprocess.Popen(["dvc", "repro"], cwd=harness.root, env=harness.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not stage_process(harness.root, "evaluate") and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    second = harness.dvc("repro")
    output, _ = first.communicate(timeout=600)
    assert second.returncode != 0 and "is busy, it is being blocked by" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert first.returncode == 0, output[-3000:]
    assert harness.check(harness.dvc("repro"), harness.logs / "concurrent.log") == []


@pytest.mark.e2e
def test_a_seed_change_leaves_the_bottleneck_of_pretrained_weights_up_to_date(harness):
    import json

    import yaml

    params = harness.root / "params.yaml"
    kept = params.read_text()
    try:
        params.write_text(yaml.safe_dump({**yaml.safe_load(kept), "seed": 7}, sort_keys=False))
        status = harness.dvc("status", "--json")
    finally:
        params.write_text(kept)
    stale = set(json.loads(status.stdout))
    assert {"train_head", "fine_tune", "evaluate"} <= stale and "bottleneck" not in stale, status.stdout

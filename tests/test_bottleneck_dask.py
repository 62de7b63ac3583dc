"""The bottleneck stage on Beam's DaskRunner: a real `dask scheduler` and two `dask worker` processes on loopback.

On 100 of the shared flower photos (20 a class; its own xdist group, beside the
session pipeline), against the DirectRunner on the same photos: the same
features, work on both workers, `dvc repro` treating the output like any other,
and a worker killed mid-run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import features, records
from components.stages import bottleneck
from components.vector_cache import VectorCache
from conftest import BIN, FLOWERS, copy_repo, keras_home_with_weights, project_env, require_shared, run
from test_bottleneck import all_features as features_of

pytestmark = pytest.mark.e2e
PHOTOS_PER_CLASS = 20
PHOTOS = 5 * PHOTOS_PER_CLASS  # ../shared/data/flowers has five classes
SHARD_SIZE = 8  # 100 photos -> about 13 shards: tasks for both workers


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen]


@contextmanager
def dask_cluster(folder: Path, env: dict, n_workers: int = 2):
    """`dask scheduler` + n `dask worker` processes (one thread, no nanny: a killed worker stays dead).

    The workers run in their own folder, so a relative path that reached them
    unresolved would land there, not in the project.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    log = open(folder / "cluster.log", "w")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        workdir = folder / "workers"
        workdir.mkdir(exist_ok=True)
        workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                     "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                    cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
                   for i in range(n_workers)]
        procs += workers
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield Cluster(address, workers)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)  # a scheduler that lost a worker can wait on it for half a minute
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def dask_params(root: Path, address: str, cache_dir: str, photos: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(photos), sha256="", shard_size=SHARD_SIZE)
    params["bottleneck"].update(runner="dask", dask_address=address, cache_dir=cache_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_same_features(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == PHOTOS
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= features.RECOMPUTED_ATOL, f"features differ from the DirectRunner's by up to {worst}"


def worker_pids(report: dict) -> dict[int, int]:
    return {int(w.rsplit(":", 1)[1]): n for w, n in report["forward_passes_by_worker"].items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The projects' environment: graftline on PATH, the shared ImageNet weights in a temporary KERAS_HOME."""
    require_shared()
    return project_env(keras_home_with_weights(tmp_path_factory.mktemp("keras")))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The first PHOTOS_PER_CLASS photos of each class of ../shared/data/flowers, copied."""
    folder = tmp_path_factory.mktemp("photos")
    for cls in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        (folder / cls.name).mkdir()
        for photo in sorted(cls.iterdir())[:PHOTOS_PER_CLASS]:
            shutil.copy(photo, folder / cls.name / photo.name)
    return folder


@pytest.fixture(scope="module")
def direct_features(dask_project, env, tmp_path_factory) -> dict[str, np.ndarray]:
    """The same photos' features from the default DirectRunner: `graftline bottleneck` on a copy of the project."""
    root = tmp_path_factory.mktemp("direct") / "project"
    shutil.copytree(dask_project["root"], root,
                    ignore=shutil.ignore_patterns(".dvc", ".git", "feature_cache", "bottlenecks"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["bottleneck"].update(runner="DirectRunner", dask_address="", cache_dir="")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([str(BIN / "graftline"), "bottleneck"], root, env, root.parent / "bottleneck.log")
    return features_of(root / "artifacts" / "bottlenecks")


@pytest.fixture(scope="module")
def direct_features_by_sha(dask_project, direct_features) -> dict[str, np.ndarray]:
    """The same, keyed like the feature cache (sha256 of the image bytes)."""
    import hashlib

    by_sha = {}
    for split in records.SPLITS:
        for shard in records.shard_paths(dask_project["root"] / "artifacts" / "examples", split):
            for record in records.read_shard(str(shard)):
                by_sha[hashlib.sha256(record.image).hexdigest()] = direct_features[record.key]
    return by_sha


@pytest.fixture(scope="module")
def dask_project(env, photos, tmp_path_factory):
    """ingest + bottleneck by `dvc repro bottleneck` in a fresh git repo, bottleneck on the Dask cluster."""
    base = tmp_path_factory.mktemp("dask")
    root = base / "project"
    root.mkdir()
    copy_repo(root)
    with dask_cluster(base / "cluster", env) as cluster:
        dask_params(root, cluster.address, "data/feature_cache", photos)  # relative: the client resolves it
        logs = base / "logs"
        logs.mkdir()
        run(["git", "init", "-q", "-b", "main"], root, env, logs / "git-init.log")
        run(["git", "add", "-A"], root, env, logs / "git-add.log")
        run(["git", "commit", "-qm", "dask"], root, env, logs / "git-commit.log")
        first = run(["dvc", "repro", "bottleneck"], root, env, logs / "repro.log")
        again = run(["dvc", "repro", "bottleneck"], root, env, logs / "repro-again.log")
        status = run(["dvc", "status", "bottleneck"], root, env, logs / "status.log")
        yield {"root": root, "cluster": cluster, "first": first, "again": again, "status": status,
               "report": json.loads((root / "reports" / "bottleneck.json").read_text()), "base": base}


def test_dask_features_equal_the_direct_runners(dask_project, direct_features):
    assert_same_features(features_of(dask_project["root"] / "artifacts" / "bottlenecks"), direct_features)
    report = dask_project["report"]
    shards = len(list((dask_project["root"] / "artifacts" / "examples").glob("*.tfrecord.gz")))
    sizes = json.loads((dask_project["root"] / "reports" / "ingest.json").read_text())["splits"]
    assert shards == sum(-(-n // SHARD_SIZE) for n in sizes.values()) >= 8
    assert report["forward_passes"] == PHOTOS and report["parts"] == shards
    assert f"--dask_npartitions={shards}" in report["beam_flags"]


def test_both_dask_workers_did_part_of_the_work(dask_project):
    passes = worker_pids(dask_project["report"])
    cluster_pids = {w.pid for w in dask_project["cluster"].workers}
    assert set(passes) == cluster_pids, f"forward passes by pid {passes}, cluster workers {cluster_pids}"
    assert all(n > 0 for n in passes.values()) and sum(passes.values()) == PHOTOS


def test_dvc_treats_the_dask_output_like_any_other(dask_project):
    root = dask_project["root"]
    assert "Running stage 'bottleneck'" in dask_project["first"]
    assert "Running stage" not in dask_project["again"]  # nothing changed: nothing re-run
    assert "up to date" in dask_project["status"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["bottleneck"]
    out = next(o for o in lock["outs"] if o["path"] == "artifacts/bottlenecks")
    shards = len(list((root / "artifacts" / "examples").glob("*.tfrecord.gz")))
    assert out["nfiles"] == shards + 1  # the parts and manifest.json, nothing else
    manifest = json.loads((root / "artifacts" / "bottlenecks" / bottleneck.MANIFEST).read_text())
    assert sum(p["rows"] for p in manifest["parts"]) == PHOTOS and len(manifest["parts"]) == shards
    # The relative cache_dir was resolved by the client: entries in the project, none in the workers' folder.
    assert len(list((root / "data" / "feature_cache").rglob("*.f32"))) == PHOTOS
    assert not list((dask_project["base"] / "cluster" / "workers").rglob("*.f32"))


def test_a_worker_killed_mid_run_leaves_no_partial_output(env, photos, dask_project, direct_features,
                                                          direct_features_by_sha, tmp_path):
    """Kill one of two workers right after its first part: Dask reruns its tasks on the other."""
    root = tmp_path / "project"
    shutil.copytree(dask_project["root"], root, ignore=shutil.ignore_patterns(".dvc", ".git", "feature_cache"))
    shutil.rmtree(root / "artifacts" / "bottlenecks")
    (root / "reports" / "bottleneck.json").unlink()  # the copied run's: only this run may write one
    cache = tmp_path / "cache"
    with dask_cluster(tmp_path / "cluster", env) as cluster:
        dask_params(root, cluster.address, str(cache), photos)
        stage = subprocess.Popen([str(BIN / "graftline"), "bottleneck"], cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        victims = {w.pid: w for w in cluster.workers}
        killed = None
        deadline = time.time() + 300
        while killed is None and stage.poll() is None and time.time() < deadline:
            for receipt in root.glob(f"artifacts/.bottlenecks.tmp-*/**/*{bottleneck.RECEIPT_SUFFIX}"):
                try:
                    pid = int(json.loads(receipt.read_text())["worker"].rsplit(":", 1)[1])
                except (OSError, ValueError):
                    continue  # renamed away between glob and read
                if pid in victims:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.05)
        output, _ = stage.communicate(timeout=600)
    assert killed is not None, f"no worker finished a part before the stage ended:\n{output[-3000:]}"
    assert victims[killed].wait(timeout=10) == -signal.SIGKILL
    out = root / "artifacts" / "bottlenecks"
    if stage.returncode == 0:  # Dask rescheduled the dead worker's tasks
        assert_same_features(features_of(out), direct_features)
        report = json.loads((root / "reports" / "bottleneck.json").read_text())
        assert report["rows"] == {s: len(features.read_split(out, s)[0]) for s in records.SPLITS}
        # A shard the dead worker had finished is re-run elsewhere and served from the cache it had filled.
        assert report["forward_passes"] + report["cache"]["hits"] == PHOTOS
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [bottleneck.MANIFEST] + [records.part_name(str(s)) for s in (root / "artifacts" / "examples").glob("*.tfrecord.gz")])
    else:  # or the stage failed: one clear line, and no output at all
        assert "bottleneck: the Dask run failed" in output, output[-3000:]
        assert not out.exists()
    assert not list(root.glob("artifacts/.bottlenecks.tmp-*")), "a staging folder was left behind"
    # Every cache entry is whole; a torn write can only be a *.tmp-* file, which is never read.
    entries = list(cache.rglob("*.f32"))
    assert entries and all(e.stat().st_size == 1280 * 4 + 4 for e in entries)
    fingerprint_folder = next(cache.iterdir())
    reader = VectorCache(str(cache), fingerprint_folder.name, (1280,))
    for entry in entries:
        vector, rejected = reader.get(entry.stem)
        assert vector is not None and not rejected
        np.testing.assert_allclose(vector, direct_features_by_sha[entry.stem], atol=features.RECOMPUTED_ATOL)


def test_several_bases_on_dask_give_the_backbone_s_features(env, dask_project, tmp_path):
    """Two bases side by side on the same cluster: every photo's features are the backbone's (each base's own,
    side by side) as this process computes them, both workers took part, and the cache folder is the pair's."""
    import tensorflow as tf

    from components import images
    from components.backbone import Backbone
    from conftest import keras_home_set
    from pipeline import params as params_mod

    pair = "efficientnet_lite0+mobilenet_v2"
    root = tmp_path / "project"
    shutil.copytree(dask_project["root"], root,
                    ignore=shutil.ignore_patterns(".dvc", ".git", "feature_cache", "bottlenecks"))
    (root / "reports" / "bottleneck.json").unlink()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"].update(model=pair, image_size=160)  # MobileNetV2's shared weights are the 160 px file here
    params["bottleneck"]["cache_dir"] = str(tmp_path / "cache")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([str(BIN / "graftline"), "bottleneck"], root, env, tmp_path / "bottleneck.log")

    report = json.loads((root / "reports" / "bottleneck.json").read_text())
    assert report["feature_width"] == 2 * 1280 and report["forward_passes"] == PHOTOS
    assert set(worker_pids(report)) == {w.pid for w in dask_project["cluster"].workers}
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == [pair]
    with keras_home_set(env["KERAS_HOME"]):
        extractor = Backbone.from_params(params_mod.load(root / "params.yaml"), training=False).extractor()
    recs = [r for split in records.SPLITS
            for shard in records.shard_paths(root / "artifacts" / "examples", split) for r in records.read_shard(str(shard))]
    here = {}
    for i in range(0, len(recs), 16):
        batch = recs[i:i + 16]
        computed = extractor(images.decode_batch(tf.constant([r.image for r in batch]), 160), training=False).numpy()
        here.update({r.key: vector for r, vector in zip(batch, computed)})
    assert_same_features(features_of(root / "artifacts" / "bottlenecks"), here)

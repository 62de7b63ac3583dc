"""The Beam bottleneck stage on drawn photos: Parquet schema, runners, the per-image feature cache."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

from components import beam_runners, features, records
from components.stages import bottleneck, ingest
from drawing import make_class_tree
from pipeline import params as params_mod
from pipeline import runtime

SIZE = 96


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A real Keras weights file for MobileNetV2 alpha 0.35 (seeded random values): no download."""
    import keras

    from components import base_models

    runtime.configure(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35.weights.h5"
    base_models.build_base("mobilenet_v2", 0.35, SIZE, None).save_weights(path)
    del keras
    return path


def make_params(weights: Path, cache_dir: str = "", workers: int = 1, image_size: int = SIZE,
                runner: str = "DirectRunner", engine: str = "auto"):
    return params_mod.from_dict({
        "data": {"source": "unused", "sha256": "", "val_percent": 25, "test_percent": 25},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": image_size, "weights": str(weights)},
        "bottleneck": {"cache_dir": cache_dir, "workers": workers, "batch_size": 8, "runner": runner,
                       "engine": engine},
    })


def ingested(tmp: Path, counts: dict[str, int], start: int = 0, tree: Path | None = None) -> Path:
    tree = make_class_tree(tree or tmp / "photos", counts, size=(48, 40), start=start)
    p = params_mod.from_dict({"data": {"source": str(tree), "sha256": "", "val_percent": 25, "test_percent": 25}})
    out = tmp / "work"
    ingest.run(p, {"downloads": out / "download", "extract_dir": out / "raw"},
               {"examples": out / "examples", "labels": out / "labels.json", "report": out / "ingest.json"})
    return out / "examples"


def extract(params, examples: Path, out: Path) -> dict:
    runtime.configure(params.seed)
    return bottleneck.run(params, {"examples": examples}, {"bottlenecks": out / "bottlenecks", "report": out / "report.json"})


def all_features(folder: Path) -> dict[str, np.ndarray]:
    found = {}
    for split in records.SPLITS:
        keys, _, feats = features.read_split(folder, split)
        found.update(zip(keys, feats))
    return found


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    return ingested(tmp_path_factory.mktemp("photos"), {"cats": 10, "dogs": 10, "owls": 10})


def test_parquet_schema_rows_and_keys(weights, examples, tmp_path):
    report = extract(make_params(weights), examples, tmp_path)
    assert report["forward_passes"] == 30 and report["feature_width"] == 1280
    for split in records.SPLITS:
        paths = features.files(tmp_path / "bottlenecks", split)
        schema = pq.read_schema(paths[0])
        assert schema.equals(features.schema(1280), check_metadata=False)
        assert str(schema.field("features").type) == "fixed_size_list<item: float>[1280]"
        keys, labels, feats = features.read_split(tmp_path / "bottlenecks", split)
        import tensorflow as tf

        recs = [records.from_example(r.numpy()) for r in tf.data.TFRecordDataset(
            [str(p) for p in records.shard_paths(examples, split)], compression_type="GZIP")]
        assert keys == sorted(r.key for r in recs) and report["rows"][split] == len(recs)
        assert labels.tolist() == [r.label for r in sorted(recs, key=lambda r: r.key)]
        assert np.isfinite(feats).all() and feats.std() > 0


def test_in_memory_and_multi_process_give_the_same_features(weights, examples, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where Beam makes its temporary folders
    in_memory = extract(make_params(weights, workers=1), examples, tmp_path / "one")
    multi = extract(make_params(weights, workers=2), examples, tmp_path / "two")
    # DirectRunner runs on Beam's FnApiRunner, not Prism: no Prism download tried, no beam-temp folder left
    assert not list(temp.glob("beam-temp*"))
    assert "--direct_running_mode=multi_processing" in multi["beam_flags"]
    assert "--direct_num_workers=2" in multi["beam_flags"]
    assert in_memory["forward_passes"] == multi["forward_passes"] == 30
    a, b = all_features(tmp_path / "one" / "bottlenecks"), all_features(tmp_path / "two" / "bottlenecks")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=features.RECOMPUTED_ATOL)
    # workers x threads never exceeds the cores
    import os

    assert multi["threads_per_worker"] * 2 <= max(2, os.cpu_count())


def test_user_flags_override_the_running_mode(weights):
    params = params_mod.from_dict({
        "data": {"source": "unused", "sha256": ""},
        "bottleneck": {"workers": 4, "beam_options": ["--direct_running_mode=multi_threading"]},
    })
    flags = beam_runners.beam_flags(params.bottleneck)
    assert flags == ["--runner=DirectRunner", "--direct_running_mode=multi_threading"]


def progress_bars(err: str) -> list[str]:
    """The bottleneck bar's lines as the terminal last showed them (tqdm redraws after a carriage return)."""
    return [line.split("\r")[-1].strip() for line in err.split("\n") if "bottleneck: forward passes" in line]


def test_rerun_after_adding_photos_makes_only_the_new_forward_passes(weights, tmp_path, capfd):
    cache = str(tmp_path / "cache")
    tree = tmp_path / "photos"
    examples = ingested(tmp_path, {"cats": 8, "dogs": 8}, tree=tree)
    capfd.readouterr()
    first = extract(make_params(weights, cache), examples, tmp_path / "run1")
    assert first["forward_passes"] == 16 and first["cache"]["hits"] == 0
    # The bar counts photos to compute, batch by batch, against its total from the start.
    bars = progress_bars(capfd.readouterr().err)
    assert len(bars) == 1 and "16/16" in bars[0] and "(litert)" in bars[0], bars
    again = extract(make_params(weights, cache), examples, tmp_path / "run2")
    assert again["forward_passes"] == 0 and again["cache"]["hits"] == 16
    assert _equal(all_features(tmp_path / "run1/bottlenecks"), all_features(tmp_path / "run2/bottlenecks"))

    examples = ingested(tmp_path, {"cats": 3, "dogs": 2}, start=100, tree=tree)  # 5 new photos
    capfd.readouterr()
    grown = extract(make_params(weights, cache), examples, tmp_path / "run3")
    assert grown["forward_passes"] == 5 and grown["cache"]["hits"] == 16
    bars = progress_bars(capfd.readouterr().err)
    assert len(bars) == 1 and "5/5" in bars[0], bars  # cache hits are not in its total
    grown_features = all_features(tmp_path / "run3/bottlenecks")
    assert len(grown_features) == 21
    old = all_features(tmp_path / "run1/bottlenecks")
    assert _equal(old, {k: grown_features[k] for k in old})

    resized = extract(make_params(weights, cache, image_size=SIZE + 32), examples, tmp_path / "run4")
    assert resized["forward_passes"] == 21 and resized["cache"]["folder"] != grown["cache"]["folder"]


def test_litert_and_tensorflow_engines_agree_and_cache_apart(weights, examples, tmp_path):
    """bottleneck.engine: LiteRT's features within the stated tolerance of TensorFlow's, each engine's in its
    own cache folder (a switch recomputes, never mixes), the report naming the engine that ran."""
    from components import engines

    cache = str(tmp_path / "cache")
    tf_run = extract(make_params(weights, cache, engine="tensorflow"), examples, tmp_path / "tf")
    lite_run = extract(make_params(weights, cache, engine="litert"), examples, tmp_path / "lite")
    auto_run = extract(make_params(weights, cache), examples, tmp_path / "auto")  # no GPU here: LiteRT
    assert tf_run["engine"]["ran"] == "tensorflow" and tf_run["engine"]["conversion_s"] is None
    assert lite_run["engine"]["ran"] == auto_run["engine"]["ran"] == "litert" and lite_run["engine"]["conversion_s"] > 0
    assert tf_run["forward_passes"] == lite_run["forward_passes"] == 30 and auto_run["cache"]["hits"] == 30
    assert tf_run["cache"]["folder"] != lite_run["cache"]["folder"] == auto_run["cache"]["folder"]
    reference, litert = all_features(tmp_path / "tf" / "bottlenecks"), all_features(tmp_path / "lite" / "bottlenecks")
    assert reference.keys() == litert.keys()
    for key in reference:
        scale = np.abs(reference[key]).max()
        assert scale > 0 and np.isfinite(litert[key]).all()
        assert np.abs(litert[key] - reference[key]).max() <= engines.FEATURE_TOLERANCE * scale, key


def test_torn_or_corrupt_cache_entries_are_recomputed_not_read(weights, examples, tmp_path):
    cache = tmp_path / "cache"
    extract(make_params(weights, str(cache)), examples, tmp_path / "run1")
    entries = sorted(cache.rglob("*.f32"))
    assert len(entries) == 30
    torn, flipped = entries[0], entries[1]
    torn.write_bytes(torn.read_bytes()[:1000])  # a write killed halfway
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF  # same length, wrong checksum
    flipped.write_bytes(bytes(data))
    report = extract(make_params(weights, str(cache)), examples, tmp_path / "run2")
    assert report["forward_passes"] == 2 and report["cache"]["unreadable_entries_recomputed"] == 2
    assert report["cache"]["hits"] == 28
    first, second = all_features(tmp_path / "run1/bottlenecks"), all_features(tmp_path / "run2/bottlenecks")
    recomputed = {key for key, sha in image_sha256s(examples).items() if sha in (torn.stem, flipped.stem)}
    assert len(recomputed) == 2 and first.keys() == second.keys()
    # Read from the cache: bit-equal. Recomputed in a batch of 2 instead of the first run's: within tolerance.
    assert _equal({k: v for k, v in first.items() if k not in recomputed},
                  {k: v for k, v in second.items() if k not in recomputed})
    for key in recomputed:
        np.testing.assert_allclose(second[key], first[key], atol=features.RECOMPUTED_ATOL, rtol=0)
        assert not np.array_equal(second[key], np.zeros_like(second[key]))
    assert len(flipped.read_bytes()) == 1280 * 4 + 4 and not list(cache.rglob("*.tmp-*"))


def test_random_weights_are_never_cached(examples, tmp_path):
    params = params_mod.from_dict({
        "data": {"source": "unused", "sha256": ""},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": SIZE, "weights": "none"},
        "bottleneck": {"cache_dir": str(tmp_path / "cache")},
    })
    report = extract(params, examples, tmp_path)
    assert report["cache"]["folder"] is None and not (tmp_path / "cache").exists()
    # auto keeps random weights on TensorFlow: later stages build the same random base, on TensorFlow
    assert report["engine"] == {"setting": "auto", "ran": "tensorflow", "conversion_s": None}


def test_missing_examples_is_one_clear_error(weights, tmp_path):
    from components.errors import GraftlineError

    with pytest.raises(GraftlineError, match="run ingest first"):
        extract(make_params(weights), tmp_path / "nothing", tmp_path)
    assert not (tmp_path / "bottlenecks").exists()


def test_dask_local_cluster_spreads_shards_and_matches_the_direct_runner(weights, tmp_path):
    """runner dask without an address: a local cluster of bottleneck.workers processes, closed afterwards."""
    import os

    examples = ingested(tmp_path, {"cats": 12, "dogs": 12})
    for shard in list(examples.glob("*.tfrecord.gz")):  # re-shard by 3 photos: several tasks per worker
        split = shard.name.split("-")[0]
        recs = list(records.read_shard(str(shard)))
        shard.unlink()
        records.write_shards(iter(recs), examples, split, len(recs), 3)
    direct = extract(make_params(weights), examples, tmp_path / "direct")
    dask = extract(make_params(weights, workers=2, runner="dask"), examples, tmp_path / "dask")
    assert dask["parts"] == len(list(examples.glob("*.tfrecord.gz"))) >= 8
    assert dask["rows"] == direct["rows"] and dask["forward_passes"] == 24
    pids = {int(w.rsplit(":", 1)[1]) for w in dask["forward_passes_by_worker"]}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    a, b = all_features(tmp_path / "direct/bottlenecks"), all_features(tmp_path / "dask/bottlenecks")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=features.RECOMPUTED_ATOL) for k in a)


def test_an_unreachable_dask_scheduler_is_one_clear_line(weights, examples, tmp_path):
    import portpicker

    from components.errors import GraftlineError

    address = f"tcp://127.0.0.1:{portpicker.pick_unused_port()}"  # nobody listens there
    params = params_mod.from_dict({
        "data": {"source": "unused", "sha256": ""},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": SIZE, "weights": str(weights)},
        "bottleneck": {"runner": "dask", "dask_address": address, "beam_options": ["--dask_connection_timeout=3"]},
    })
    with pytest.raises(GraftlineError, match=f"cannot reach the Dask scheduler at {address} .bottleneck.dask_address"):
        extract(params, examples, tmp_path)
    assert not (tmp_path / "bottlenecks").exists() and not list(tmp_path.glob(".bottlenecks.tmp-*"))


def test_a_part_the_runner_lost_fails_the_stage(weights, examples, tmp_path):
    """A runner that drops work (Beam's DaskRunner drops what finish_bundle emits) must not pass unnoticed."""
    from components.errors import GraftlineError

    folder = tmp_path / "staging"
    folder.mkdir()
    units = [("train", "train-00000-of-00002.tfrecord.gz", "train-00000-of-00002.parquet"),
             ("train", "train-00001-of-00002.tfrecord.gz", "train-00001-of-00002.parquet")]
    (folder / ("train-00000-of-00002.parquet" + bottleneck.RECEIPT_SUFFIX)).write_text(
        '{"part": "train-00000-of-00002.parquet", "split": "train", "rows": 3}')
    with pytest.raises(GraftlineError, match="wrote no part for train-00001-of-00002.tfrecord.gz"):
        bottleneck._collect_receipts(str(folder), units, "SomeRunner", "out")


def test_dask_address_needs_the_dask_runner():
    with pytest.raises(params_mod.ParamsError, match="bottleneck.dask_address"):
        params_mod.from_dict({"data": {"source": "x", "sha256": ""},
                              "bottleneck": {"dask_address": "tcp://10.0.0.1:8786"}})
    flags = beam_runners.beam_flags(params_mod.from_dict({"data": {"source": "x", "sha256": ""}, "bottleneck": {
        "runner": "dask", "dask_address": "tcp://10.0.0.1:8786"}}).bottleneck, units=5, dask_address="tcp://10.0.0.1:8786")
    assert flags == [f"--runner={beam_runners.DASK_RUNNER}", "--dask_client_address=tcp://10.0.0.1:8786",
                     "--dask_npartitions=5"]


class RootFileSystem(LocalFileSystem):
    """``rootfs://<path>``: a local folder behind a scheme that is not local, as gs:// and s3:// are.

    A real Beam FileSystem (Beam finds it by its scheme), so the stage's code
    for non-local locations (no folder renames: parts renamed one by one,
    manifest last) runs here without a cloud account.
    """
    ROOT = ""

    @classmethod
    def scheme(cls):
        return "rootfs"

    def _local(self, url: str) -> str:
        return os.path.join(self.ROOT, url[len("rootfs://"):])

    def join(self, base, *paths):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, url):
        return tuple(url.rsplit("/", 1))

    def mkdirs(self, url):
        super().mkdirs(self._local(url))

    def _list(self, prefix):
        for folder, _, names in os.walk(self._local(prefix)):
            for name in names:
                local = os.path.join(folder, name)
                yield FileMetadata("rootfs://" + os.path.relpath(local, self.ROOT), os.path.getsize(local),
                                   os.path.getmtime(local))

    def create(self, url, *args, **kwargs):
        return super().create(self._local(url), *args, **kwargs)

    def open(self, url, *args, **kwargs):
        return super().open(self._local(url), *args, **kwargs)

    def rename(self, sources, destinations):
        super().rename([self._local(u) for u in sources], [self._local(u) for u in destinations])

    def exists(self, url):
        return super().exists(self._local(url))

    def delete(self, urls):  # LocalFileSystem.delete matches its paths again, which here would be URLs
        import shutil

        for url in urls:
            local = self._local(url)
            if not os.path.exists(local):
                raise BeamIOError("Delete operation failed", {url: FileNotFoundError(local)})
            shutil.rmtree(local) if os.path.isdir(local) else os.remove(local)


def test_examples_cache_and_output_on_a_non_local_filesystem(weights, examples, tmp_path):
    """Shards read, cache entries and Parquet parts written, all through Beam FileSystems under rootfs://."""
    import shutil

    RootFileSystem.ROOT = str(tmp_path / "bucket")
    shutil.copytree(examples, tmp_path / "bucket" / "examples")
    local = extract(make_params(weights), examples, tmp_path / "local")
    params = make_params(weights, cache_dir="rootfs://cache")
    runtime.configure(params.seed)
    outputs = {"bottlenecks": "rootfs://out/bottlenecks", "report": tmp_path / "report.json"}
    report = bottleneck.run(params, {"examples": "rootfs://examples"}, outputs)
    again = bottleneck.run(params, {"examples": "rootfs://examples"}, outputs)  # over the first output
    assert report["forward_passes"] == 30 and again["cache"]["hits"] == 30 and again["forward_passes"] == 0
    published = tmp_path / "bucket" / "out" / "bottlenecks"
    assert sorted(p.name for p in published.iterdir()) == sorted(
        [bottleneck.MANIFEST] + [records.part_name(str(s)) for s in examples.glob("*.tfrecord.gz")])
    assert not [p for p in (tmp_path / "bucket" / "out").iterdir() if p.name != "bottlenecks"]  # no staging left
    assert len(list((tmp_path / "bucket" / "cache").rglob("*.f32"))) == 30
    remote, here = all_features(published), all_features(tmp_path / "local" / "bottlenecks")
    assert remote.keys() == here.keys() and all(np.allclose(remote[k], here[k], atol=features.RECOMPUTED_ATOL)
                                                for k in here)
    assert report["rows"] == local["rows"]


def image_sha256s(examples: Path) -> dict[str, str]:
    """key -> sha256 of the stored image bytes (the feature cache's key)."""
    import hashlib

    return {r.key: hashlib.sha256(r.image).hexdigest()
            for shard in sorted(examples.glob("*.tfrecord.gz")) for r in records.read_shard(str(shard))}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

"""Ingest streams: peak memory does not grow with the number of photos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DRIVER = """
import json, resource, sys
from pathlib import Path
from components.stages import ingest
from pipeline import params, runtime
runtime.configure(0)
src, out = Path(sys.argv[1]), Path(sys.argv[2])
p = params.from_dict({"data": {"source": str(src), "sha256": "", "workers": 1, "shard_size": 200}})
report = ingest.run(p, {"downloads": out / "download", "extract_dir": out / "raw"},
                    {"examples": out / "examples", "labels": out / "labels.json", "report": out / "report.json"})
print(json.dumps({"n": report["num_examples"], "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def noisy_photos(folder: Path, n: int, seed: int) -> int:
    """n distinct noise JPEGs (~40 KB each): holding them all would show in RSS."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        path = folder / f"class{i % 3}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def peak_rss(source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", DRIVER, str(source), str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_the_number_of_photos(tmp_path):
    noisy_photos(tmp_path / "small", 150, seed=1)
    big_bytes = noisy_photos(tmp_path / "big", 1500, seed=2)
    small = peak_rss(tmp_path / "small", tmp_path / "out-small")
    big = peak_rss(tmp_path / "big", tmp_path / "out-big")
    assert (small["n"], big["n"]) == (150, 1500)
    assert big_bytes > 50 * 2**20  # the big folder would add > 50 MiB if it were held in memory
    assert big["rss_mib"] - small["rss_mib"] < 25, (small, big)
    shards = sorted((tmp_path / "out-big" / "examples").glob("train-*.tfrecord.gz"))
    assert len(shards) > 1  # data.shard_size=200 split the big train split


def test_parallel_checking_falls_back_when_workers_cannot_start(tmp_path):
    """A __main__ read from stdin cannot be re-imported by spawned workers: finish in one process, never hang."""
    from drawing import make_class_tree

    make_class_tree(tmp_path / "photos", {"cats": 230, "dogs": 230}, size=(16, 16))
    script = DRIVER.replace('"workers": 1', '"workers": 2')
    result = subprocess.run([sys.executable, "-"], input=script.replace("sys.argv[1]", repr(str(tmp_path / "photos")))
                            .replace("sys.argv[2]", repr(str(tmp_path / "out"))),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 460
    assert "continuing in one process" in result.stderr

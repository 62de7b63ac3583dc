"""components/records.py: the TFRecord schema round trip and sharding."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from components import records
from drawing import encode, pixels


def make_record(i: int, label: int = 0, split_name: str = "cats") -> records.Record:
    image = encode(pixels((200, 20 * (i % 10), 40), (16, 16), seed=i), "PNG")
    return records.Record(f"{split_name}/photo_{i:03d}.png", label, split_name, hashlib.sha256(image).hexdigest(), image)


def test_record_survives_to_example_and_back():
    record = make_record(3, label=7, split_name="tulips")
    serialized = records.to_example(record)
    assert isinstance(serialized, bytes)
    assert records.from_example(serialized) == record


def test_non_ascii_key_and_binary_image_round_trip():
    record = records.Record("fleurs/été ñ 你好.jpg", 0, "fleurs", "ab" * 32, bytes(range(256)) * 3)
    assert records.from_example(records.to_example(record)) == record


def test_parse_gives_the_same_fields_as_from_example():
    import tensorflow as tf

    record = make_record(5, label=2)
    parsed = records.parse(tf.constant(records.to_example(record)))
    assert parsed[records.KEY].numpy().decode() == record.key
    assert int(parsed[records.LABEL].numpy()) == 2
    assert parsed[records.LABEL_NAME].numpy().decode() == record.label_name
    assert parsed[records.SHA256].numpy().decode() == record.sha256
    assert parsed[records.IMAGE].numpy() == record.image


def test_shard_name_format():
    assert records.shard_name("train", 0, 3) == "train-00000-of-00003.tfrecord.gz"
    assert records.shard_name("val", 12, 100) == "val-00012-of-00100.tfrecord.gz"


@pytest.mark.parametrize("count, shard_size", [(10, 3), (9, 3), (7, 100), (1, 1), (5, 1)])
def test_write_shards_then_read_back_in_order(tmp_path, count, shard_size):
    written = [make_record(i, label=i % 3, split_name=("a", "b", "c")[i % 3]) for i in range(count)]
    paths = records.write_shards(iter(written), tmp_path, "train", count, shard_size)
    n = math.ceil(count / shard_size)
    assert [p.name for p in paths] == [f"train-{i:05d}-of-{n:05d}.tfrecord.gz" for i in range(n)]
    assert records.shard_paths(tmp_path, "train") == paths
    assert all(p.stat().st_size > 0 for p in paths)

    read = [
        records.Record(ex[records.KEY].decode(), int(ex[records.LABEL]), ex[records.LABEL_NAME].decode(),
                       ex[records.SHA256].decode(), ex[records.IMAGE])
        for ex in records.dataset(tmp_path, "train").as_numpy_iterator()
    ]
    assert read == written


def test_each_shard_holds_shard_size_records_except_the_last(tmp_path):
    import tensorflow as tf

    written = [make_record(i) for i in range(11)]
    paths = records.write_shards(written, tmp_path, "val", 11, 4)
    per_shard = [
        [records.from_example(raw).key for raw in tf.data.TFRecordDataset(str(p), compression_type="GZIP").as_numpy_iterator()]
        for p in paths
    ]
    assert [len(s) for s in per_shard] == [4, 4, 3]
    assert sum(per_shard, []) == [r.key for r in written]


def test_shards_are_gzip_files(tmp_path):
    paths = records.write_shards([make_record(0)], tmp_path, "test", 1, 10)
    assert paths[0].read_bytes()[:2] == b"\x1f\x8b"


def test_splits_in_one_folder_do_not_mix(tmp_path):
    train = [make_record(i, 0, "a") for i in range(5)]
    val = [make_record(100 + i, 1, "b") for i in range(3)]
    records.write_shards(train, tmp_path, "train", 5, 2)
    records.write_shards(val, tmp_path, "val", 3, 2)
    keys = lambda split: [ex[records.KEY].decode() for ex in records.dataset(tmp_path, split).as_numpy_iterator()]
    assert keys("train") == [r.key for r in train]
    assert keys("val") == [r.key for r in val]
    assert records.shard_paths(tmp_path, "test") == []


def test_the_same_records_give_the_same_bytes_in_every_process(tmp_path):
    """DVC compares ingest's shards by hash: written again from the same photos, they must be byte-equal
    (a protobuf map serializes in an order that can change from one process to the next)."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; sys.path[:0] = sys.argv[2:]; "
              "from components import records; from test_records import make_record; "
              "records.write_shards((make_record(i) for i in range(12)), Path(sys.argv[1]), 'train', 12, 5)")
    tests = str(Path(__file__).parent)
    shards = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run), str(Path(tests).parent), tests],
                       check=True, capture_output=True)
        shards.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert len(shards[0]) == 3 and shards[0] == shards[1]

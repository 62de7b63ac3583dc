"""The TFRecord schema of ingested photos: the only place that spells its feature keys.

Shards are gzip TFRecord files ``{split}-{index:05d}-of-{count:05d}.tfrecord.gz``
of ``tf.train.Example`` with the encoded image bytes, the label index and
name, a stable key (the photo's path relative to the source) and the sha256
of the photo file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
COMPRESSION = "GZIP"

IMAGE = "image/encoded"
LABEL = "label"
LABEL_NAME = "label_name"
KEY = "key"
SHA256 = "sha256"


@dataclass(frozen=True)
class Record:
    key: str
    label: int
    label_name: str
    sha256: str
    image: bytes


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord.gz"


def shard_paths(examples_dir: Path, split: str) -> list[Path]:
    """The shards of one split, sorted (so reads are in a fixed order)."""
    return sorted(Path(examples_dir).glob(f"{split}-*.tfrecord.gz"))


def shard_urls(examples: str, split: str) -> list[str]:
    """The shards of one split on any Beam filesystem (local, gs://, s3://), sorted."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    try:
        found = FileSystems.match([FileSystems.join(examples, f"{split}-*.tfrecord.gz")])[0].metadata_list
    except BeamIOError:
        return []
    return sorted(m.path for m in found)


def part_name(shard_url: str) -> str:
    """The Parquet part a shard becomes: train-00000-of-00002.tfrecord.gz -> train-00000-of-00002.parquet."""
    return shard_url.rsplit("/", 1)[-1].removesuffix(".tfrecord.gz") + ".parquet"


def read_shard(shard_url: str):
    """The Records of one shard, in order, read through Beam's FileSystems (CRC-checked)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.tfrecordio import _TFRecordUtil

    with FileSystems.open(shard_url, compression_type=CompressionTypes.GZIP) as handle:
        while (serialized := _TFRecordUtil.read_record(handle)) is not None:
            yield from_example(serialized)


def to_example(record: Record) -> bytes:
    import tensorflow as tf

    def _bytes(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        IMAGE: _bytes(record.image),
        LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[record.label])),
        LABEL_NAME: _bytes(record.label_name.encode()),
        KEY: _bytes(record.key.encode()),
        SHA256: _bytes(record.sha256.encode()),
    }
    # deterministic: a proto map (the features) is otherwise serialized in an order that changes run to run,
    # and DVC would see new examples, and re-run every later stage, each time ingest runs.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def _feature_spec():
    import tensorflow as tf

    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        LABEL_NAME: tf.io.FixedLenFeature([], tf.string),
        KEY: tf.io.FixedLenFeature([], tf.string),
        SHA256: tf.io.FixedLenFeature([], tf.string),
    }


def parse(serialized):
    """A serialized Example (tensor) -> dict of tensors keyed like this module's constants."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, _feature_spec())


def from_example(serialized: bytes) -> Record:
    """A serialized Example (Python bytes) -> Record, without building a TF graph."""
    import tensorflow as tf

    feature = tf.train.Example.FromString(serialized).features.feature
    return Record(
        key=feature[KEY].bytes_list.value[0].decode(),
        label=int(feature[LABEL].int64_list.value[0]),
        label_name=feature[LABEL_NAME].bytes_list.value[0].decode(),
        sha256=feature[SHA256].bytes_list.value[0].decode(),
        image=feature[IMAGE].bytes_list.value[0],
    )


def dataset(examples_dir: Path, split: str):
    """tf.data.Dataset of parsed examples of one split, in file order."""
    import tensorflow as tf

    paths = [str(p) for p in shard_paths(examples_dir, split)]
    return tf.data.TFRecordDataset(paths, compression_type=COMPRESSION).map(parse)


def write_shards(records, out_dir: Path, split: str, count: int, shard_size: int) -> list[Path]:
    """Write ``count`` records of one split as ceil(count / shard_size) shards."""
    import tensorflow as tf

    n_shards = max(1, -(-count // shard_size))
    options = tf.io.TFRecordOptions(compression_type=COMPRESSION)
    paths = [Path(out_dir) / shard_name(split, i, n_shards) for i in range(n_shards)]
    iterator = iter(records)
    for i, path in enumerate(paths):
        with tf.io.TFRecordWriter(str(path), options) as writer:
            for _ in range(shard_size if i < n_shards - 1 else count - shard_size * (n_shards - 1)):
                writer.write(to_example(next(iterator)))
    return paths

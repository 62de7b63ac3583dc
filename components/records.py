"""The TFRecord schema of ingested photos: the only place that spells its feature keys.

Shards are gzip TFRecord files ``{split}-{index:05d}-of-{count:05d}.tfrecord.gz``
of ``tf.train.Example`` with the encoded image bytes, the label index and
name, a stable key (the photo's path relative to the source) and the sha256
of the photo file.
"""
from __future__ import annotations

import functools
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


def read_all(examples_dir: Path):
    """The Records of every split, split by split in records.SPLITS order, each split's shards in order."""
    for split in SPLITS:
        for shard in shard_paths(examples_dir, split):
            yield from read_shard(str(shard))


@functools.cache
def _example_class():
    """tf.train.Example's message type (tensorflow/core/example/{example,feature}.proto), built with the
    protobuf library alone: writing and reading records needs no TensorFlow import (seconds per process)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="graftline/example.proto", package="graftline.tf", syntax="proto3")

    def message(name, *fields, nested=(), map_entry=False):
        m = proto.message_type.add(name=name) if not nested else nested
        m.name = name
        for number, (field, kind, label, type_name) in enumerate(fields, 1):
            m.field.add(name=field, number=number, type=kind, label=label, type_name=type_name or None)
        if map_entry:
            m.options.map_entry = True
        return m

    repeated, optional = f.LABEL_REPEATED, f.LABEL_OPTIONAL
    message("BytesList", ("value", f.TYPE_BYTES, repeated, ""))
    message("FloatList", ("value", f.TYPE_FLOAT, repeated, ""))
    message("Int64List", ("value", f.TYPE_INT64, repeated, ""))
    feature = message("Feature", ("bytes_list", f.TYPE_MESSAGE, optional, ".graftline.tf.BytesList"),
                      ("float_list", f.TYPE_MESSAGE, optional, ".graftline.tf.FloatList"),
                      ("int64_list", f.TYPE_MESSAGE, optional, ".graftline.tf.Int64List"))
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = message("Features", ("feature", f.TYPE_MESSAGE, repeated, ".graftline.tf.Features.FeatureEntry"))
    message("FeatureEntry", ("key", f.TYPE_STRING, optional, ""),
            ("value", f.TYPE_MESSAGE, optional, ".graftline.tf.Feature"), nested=features.nested_type.add(),
            map_entry=True)
    message("Example", ("features", f.TYPE_MESSAGE, optional, ".graftline.tf.Features"))
    pool = descriptor_pool.DescriptorPool()  # its own pool: TensorFlow's tensorflow.Example may be loaded too
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("graftline.tf.Example"))


def to_example(record: Record) -> bytes:
    """A serialized tf.train.Example: what TensorFlow's parse_single_example and TFRecordDataset read."""
    example = _example_class()()
    feature = example.features.feature
    feature[IMAGE].bytes_list.value.append(record.image)
    feature[LABEL].int64_list.value.append(record.label)
    feature[LABEL_NAME].bytes_list.value.append(record.label_name.encode())
    feature[KEY].bytes_list.value.append(record.key.encode())
    feature[SHA256].bytes_list.value.append(record.sha256.encode())
    # deterministic: a proto map (the features) is otherwise serialized in an order that changes run to run,
    # and DVC would see new examples, and re-run every later stage, each time ingest runs.
    return example.SerializeToString(deterministic=True)


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
    """A serialized Example (Python bytes) -> Record, without TensorFlow."""
    feature = _example_class().FromString(serialized).features.feature
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


def count(examples_dir: Path, split: str) -> int:
    """How many examples one split holds (its shards read through, nothing parsed)."""
    import tensorflow as tf

    paths = [str(p) for p in shard_paths(examples_dir, split)]
    return int(tf.data.TFRecordDataset(paths, compression_type=COMPRESSION).reduce(0, lambda n, _: n + 1))


def write_shards(records, out_dir: Path, split: str, count: int, shard_size: int) -> list[Path]:
    """Write ``count`` records of one split as ceil(count / shard_size) gzip TFRecord shards (no TensorFlow:
    Beam's TFRecord framing with its CRC32C checksums, gzip with no timestamp, so the bytes repeat)."""
    import gzip

    from apache_beam.io.tfrecordio import _TFRecordUtil

    n_shards = max(1, -(-count // shard_size))
    paths = [Path(out_dir) / shard_name(split, i, n_shards) for i in range(n_shards)]
    iterator = iter(records)
    for i, path in enumerate(paths):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
            for _ in range(shard_size if i < n_shards - 1 else count - shard_size * (n_shards - 1)):
                _TFRecordUtil.write_record(handle, to_example(next(iterator)))
    return paths

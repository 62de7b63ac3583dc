"""The Parquet schema of bottleneck features: the only place that spells its columns.

One set of files per split, ``{split}-*.parquet``, each row a photo:
``key`` (string, the ingest key), ``label`` (int32), ``split`` (string) and
``features`` (fixed-size list of float32, the base's pooled output).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KEY, LABEL, SPLIT, FEATURES = "key", "label", "split", "features"
# What the code guarantees about a photo's features on one machine. Read from the feature cache,
# they are bit-equal to when they were computed. Recomputed in another batch (another size, or
# another position in it), they move in the last bits: on a CPU, oneDNN vectorises across the
# batch, and no batching reproduces the bits on every CPU (AVX-512 or AVX2). They stay within
# this absolute tolerance. MobileNetV2's features lie in [0, 6]; the largest move measured was
# 3.0e-5, between a batch of 1 and batches of 32, with oneDNN held to AVX2
# (benchmarks/stability.py).
RECOMPUTED_ATOL = 1e-4


def schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(LABEL, pa.int32(), nullable=False),
            pa.field(SPLIT, pa.string(), nullable=False),
            pa.field(FEATURES, pa.list_(pa.float32(), width), nullable=False),
        ]
    )


def table(rows, width: int) -> pa.Table:
    """(key, label, split, feature vector) tuples -> a Table with this schema, without Python float lists."""
    if not rows:
        return schema(width).empty_table()
    keys, labels, splits, vectors = zip(*rows)
    flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in vectors])
    if flat.size != width * len(rows):
        raise ValueError(f"feature vectors must have {width} values each; got {flat.size} for {len(rows)} rows")
    columns = [pa.array(keys, pa.string()), pa.array(labels, pa.int32()), pa.array(splits, pa.string()),
               pa.FixedSizeListArray.from_arrays(pa.array(flat), width)]
    return pa.Table.from_arrays(columns, schema=schema(width))


def write(table: pa.Table, handle) -> None:
    """One Parquet part. Non-compliant nested names keep the list's field 'item', so a part reads
    back with exactly this module's schema (pyarrow would otherwise rename it 'element')."""
    pq.write_table(table, handle, use_compliant_nested_type=False)


def files(bottlenecks_dir: Path, split: str) -> list[Path]:
    return sorted(Path(bottlenecks_dir).glob(f"{split}-*.parquet"))


def read_split(bottlenecks_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, labels int32 [n], features float32 [n, width]) sorted by key, for one split."""
    paths = files(bottlenecks_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split}-*.parquet files in {bottlenecks_dir}")
    table = pa.concat_tables(pq.read_table(p) for p in paths).sort_by(KEY)
    column = table.column(FEATURES).combine_chunks()
    width = column.type.list_size
    feats = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)
    labels = table.column(LABEL).to_numpy().astype(np.int32)
    return table.column(KEY).to_pylist(), labels, feats


def count_rows(bottlenecks_dir: Path, split: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files(bottlenecks_dir, split))

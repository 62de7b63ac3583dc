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


def schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(LABEL, pa.int32(), nullable=False),
            pa.field(SPLIT, pa.string(), nullable=False),
            pa.field(FEATURES, pa.list_(pa.float32(), width), nullable=False),
        ]
    )


def row(key: str, label: int, split: str, features: np.ndarray) -> dict:
    return {KEY: key, LABEL: int(label), SPLIT: split, FEATURES: np.asarray(features, np.float32).tolist()}


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

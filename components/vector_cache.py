"""A per-photo cache of arrays (features, activations) under ``root/folder/ab/<sha256>.<suffix>``.

Keyed by the sha256 of the photo's stored bytes, in a folder named by a
fingerprint of everything that determines the array (base, weights, size,
view...), so a re-run after adding k photos computes k arrays, and any change
of those inputs starts a new, empty folder. An entry is the raw array followed
by its CRC32, written under a temporary name and renamed into place: an entry
of the wrong length or checksum (a torn write, a bad disk) is a miss and is
rewritten. A temporary is named after its process and machine; the first cache
a process opens on a folder removes those this machine's dead processes left.
Local folders use plain file I/O; other locations (gs://, s3://, a cluster's
filesystem) go through Beam's FileSystems.
"""
from __future__ import annotations

import contextlib
import os
import socket
import uuid
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from components import atomic

HOST = socket.gethostname()  # in temporary names, after the pid: whose machine wrote it
_swept: set[str] = set()


def is_local(location: str) -> bool:
    return "://" not in location


class VectorCache:
    def __init__(self, root: str, folder: str, shape: tuple[int, ...], dtype=np.float32, suffix: str = "f32"):
        self.folder = os.path.join(root, folder) if is_local(root) else f"{root.rstrip('/')}/{folder}"
        self.shape, self.dtype, self.suffix = tuple(shape), np.dtype(dtype), suffix
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if is_local(self.folder):
            sweep(self.folder)

    def path(self, sha256: str) -> str:
        name = f"{sha256[:2]}/{sha256}.{self.suffix}"
        return os.path.join(self.folder, name) if is_local(self.folder) else f"{self.folder}/{name}"

    def get(self, sha256: str) -> tuple[np.ndarray | None, bool]:
        """(array or None, whether an entry existed but was unreadable)."""
        try:
            data = _read(self.path(sha256))
        except OSError:
            return None, False
        body, crc = data[:-4], data[-4:]
        if len(body) != self.nbytes or zlib.crc32(body).to_bytes(4, "little") != crc:
            return None, True
        return np.frombuffer(body, self.dtype).reshape(self.shape), False

    def put(self, sha256: str, array: np.ndarray) -> None:
        body = np.ascontiguousarray(array, self.dtype).tobytes()
        if len(body) != self.nbytes:
            raise ValueError(f"expected {self.shape} {self.dtype}, got {np.shape(array)}")
        with written(self.path(sha256)) as handle:
            handle.write(body + zlib.crc32(body).to_bytes(4, "little"))


def _read(path: str) -> bytes:
    if is_local(path):
        return Path(path).read_bytes()
    from apache_beam.io.filesystem import BeamIOError, CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read()
    except BeamIOError as exc:
        raise OSError(str(exc)) from exc


@contextlib.contextmanager
def written(final: str) -> Iterator:
    """A file on any filesystem, written under a temporary name and renamed into place.

    A task that dies or runs twice (Dask reschedules a killed worker's tasks)
    leaves either nothing or a whole file under the final name.
    """
    head, _, name = final.rpartition("/")
    tmp = f"{head}/.{name}.tmp-{os.getpid()}-{HOST}-{uuid.uuid4().hex}"
    if is_local(final):
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            yield handle
        FileSystems.rename([tmp], [final])
    except BaseException:
        with contextlib.suppress(Exception):
            FileSystems.delete([tmp])
        raise


def sweep(folder: str) -> None:
    """Remove the temporaries that dead processes of this machine left in a local cache folder (a SIGKILL while an
    entry was written), once per folder and process. Another machine's (a shared disk) are its own business."""
    if folder in _swept or not os.path.isdir(folder):
        return
    _swept.add(folder)
    for sub in os.scandir(folder):
        if sub.is_dir():
            for entry in os.scandir(sub.path):
                if entry.name.startswith(".") and f"-{HOST}-" in entry.name \
                        and atomic.left_by_a_dead_process(Path(entry.path)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

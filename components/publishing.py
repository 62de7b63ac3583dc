"""Where the bottleneck stage's parts land: local folders or object stores (gs://, s3://), through
Beam's FileSystems, appearing only once complete."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from apache_beam.io.filesystems import FileSystems

from components.atomic import atomic_dir



def absolute(location: str) -> str:
    """A local path made absolute (workers do not share the client's working folder); URLs unchanged."""
    return location if "://" in location else os.path.abspath(location)


@contextlib.contextmanager
def published(out: str) -> Iterator[str]:
    """A staging folder for the parts; on success it becomes ``out``, on failure it is removed.

    Local: a temporary folder renamed over ``out`` at once. Other filesystems
    (gs://, s3://) have no folder rename: the old files go, the parts are
    renamed one by one, and the manifest, written last, marks the output complete.
    """
    if "://" not in out:
        with atomic_dir(Path(out)) as tmp:
            yield str(tmp.resolve())
        return
    staging = f"{out.rstrip('/')}.staging-{uuid.uuid4().hex[:12]}"
    try:
        yield staging
        if FileSystems.exists(out):
            FileSystems.delete([out])
        FileSystems.mkdirs(out)  # a no-op on object stores
        moved = [m.path for m in FileSystems.match([FileSystems.join(staging, "*")])[0].metadata_list]
        FileSystems.rename(moved, [FileSystems.join(out, m.rsplit("/", 1)[-1]) for m in moved])
    finally:
        with contextlib.suppress(Exception):
            FileSystems.delete([staging])

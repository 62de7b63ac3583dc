"""Stage 0, download: ``data.url`` to ``data.source``, so that DVC tracks the photos ingest reads.

dvc.yaml makes ``data.source`` a dependency of ingest (``${data.source}``): DVC hashes that
folder or archive, with its own state cache, so adding, removing or editing a photo re-runs
ingest (and then only what the new examples change). A URL cannot be such a dependency (DVC
would ask the server every time, and fail offline), so a URL source is ``data.url``, and
this stage downloads it once, with a progress bar and the ``data.sha256`` check, to
``data.source``, which lies in ``data/download/`` (this stage's output). When data.source
is a folder or archive of your own, there is nothing to download.

Outputs: ``folder`` (data/download/).
"""
from __future__ import annotations

import time
from pathlib import Path

from components import fetch


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: none. outputs: folder (where data.source is downloaded when it lies there)."""
    started = time.time()
    folder = Path(outputs["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    downloaded = fetch.fetch_source(params.data, folder)
    return {"downloaded": str(downloaded) if downloaded else None,
            "wall_time_s": round(time.time() - started, 2)}

"""Download a file once, with a progress bar, a sha256 check and a clear offline error.

Also where a URL data source lands: ``data.url`` is downloaded to ``data.source`` when
that path lies in DOWNLOAD_DIR (the download stage's output), so that DVC tracks a local file.
"""
from __future__ import annotations

import hashlib
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from components.atomic import atomic_file
from components.errors import GraftlineError

CONNECT_TIMEOUT_S = 15  # an unreachable host fails within seconds, not minutes
# The download stage's output: a data.source inside it is downloaded from data.url.
DOWNLOAD_DIR = "data/download"
USE_A_FOLDER = ("To use photos already on this machine, point data.source at a folder of class folders: "
                "dvc exp run -S data.source=/path/to/photos (or edit params.yaml).")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _what_happened(exc: BaseException, url: str) -> str:
    """Why a connection failed, in words: no network, no such host, refused, timed out."""
    import errno
    import urllib.parse

    reason = getattr(exc, "reason", exc)
    host = urllib.parse.urlsplit(url).hostname
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host} (no network, or no such host)"
    if isinstance(reason, ConnectionRefusedError):
        return f"the connection was refused ({host} or a proxy on the way is not serving)"
    if isinstance(reason, TimeoutError):
        return f"timed out after {CONNECT_TIMEOUT_S} s"
    if getattr(reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no network: this machine seems to be offline"
    return str(reason)


def fetch(url: str, dest: Path, sha256: str = "", what: str = "file", offline_hint: str = "") -> Path:
    """Return ``dest``, downloading ``url`` there first unless a verified copy exists."""
    dest = Path(dest)
    if dest.exists():
        if not sha256 or sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt copy: fetch again
    try:
        response = urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        happened = "not found (HTTP 404)" if exc.code == 404 else f"the server answered HTTP {exc.code} ({exc.reason})"
        raise GraftlineError(f"cannot download {what} from {url}: {happened}; check {what}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise GraftlineError(f"cannot download {what} from {url}: {_what_happened(exc, url)}. {offline_hint}") from None
    total = int(response.headers.get("Content-Length") or 0) or None
    digest = hashlib.sha256()
    try:
        with response, atomic_file(dest, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}"
        ) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
            if sha256 and digest.hexdigest() != sha256:
                raise GraftlineError(
                    f"{url} downloaded with sha256 {digest.hexdigest()}, expected {sha256}: "
                    "the file changed upstream or the download is corrupt; nothing was kept."
                )
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        raise GraftlineError(f"download of {url} was interrupted ({exc}); run again to retry.") from None
    return dest


def downloads_into(source: str, download_dir: str | Path = DOWNLOAD_DIR) -> bool:
    """Whether ``data.source`` is a path in the download folder (so data.url is fetched there)."""
    try:
        Path(source).resolve().relative_to(Path(download_dir).resolve())
    except ValueError:
        return False
    return True


def fetch_source(data, download_dir: str | Path = DOWNLOAD_DIR) -> Path | None:
    """``data.url`` downloaded once to ``data.source`` (verified by data.sha256), when data.source lies in
    ``download_dir``; None when there is nothing to download (data.source is a folder or file of your own)."""
    if not data.url or not downloads_into(data.source, download_dir):
        return None
    return fetch(data.url, Path(data.source), sha256=data.sha256, what="data.url", offline_hint=USE_A_FOLDER)

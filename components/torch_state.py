"""Read a PyTorch state dict (``.pth``) into NumPy arrays, without PyTorch and without running code.

A ``.pth`` file is a pickle, and loading a pickle can call any importable
function. Here the unpickler resolves only the few globals a state dict of
plain tensors needs (ALLOWED_GLOBALS) and refuses anything else before it is
called, naming the file and the global. Both of torch's layouts are read:

- legacy (``torch.save(..., _use_new_zipfile_serialization=False)``): five
  pickles in a row (magic number, protocol, system info, the object, the
  storage keys), then each storage's raw bytes, in key order, after an int64
  element count;
- zip (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>``
  member per storage.

Tensors are rebuilt with their strides (converted checkpoints often hold
non-contiguous ones) and returned as C-contiguous copies.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from components.errors import GraftlineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> the NumPy dtype of its elements (little-endian on disk).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType(str):
    """Stands in for ``torch.<Name>Storage`` in the pickle: only its name is used."""


class _Tensor(tuple):
    """What ``torch._utils._rebuild_tensor_v2`` is replaced by: its arguments, kept for later."""


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _Tensor((storage, offset, tuple(size), tuple(stride)))


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RefusedPickle(GraftlineError):
    pass


class _Unpickler(pickle.Unpickler):
    def __init__(self, handle, path: Path):
        super().__init__(handle)
        self.path = path

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"{self.path}: refused to load: its pickle asks for the global {module}.{name}, which a state dict "
                "of tensors never needs (loading it could run code). Use a .pth that holds only a state dict."
            ) from None

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise RefusedPickle(f"{self.path}: refused to load: unexpected persistent id {pid!r:.80}")
        return ("storage", str(pid[1]), str(pid[2]), int(pid[4]))


def _bad(path: Path, what: str) -> GraftlineError:
    return GraftlineError(f"{path}: not a readable PyTorch state dict ({what})")


def _rebuild(path: Path, tensor: _Tensor, buffers: dict[str, np.ndarray]) -> np.ndarray:
    (_, kind, key, _), offset, size, stride = tensor
    flat = buffers[key]
    if offset < 0 or (size and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= flat.size):
        raise _bad(path, f"a tensor of shape {size} reaches past its storage {key}")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * item for s in stride])
    return np.array(view, order="C")  # a copy; np.ascontiguousarray would make a 0-d tensor 1-d


def _tensors(path: Path, obj, buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise _bad(path, f"its object is a {type(obj).__name__}, not a dict of tensors")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _Tensor):
            raise _bad(path, f"entry {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = _rebuild(path, value, buffers)
    return out


def _storages_of(obj) -> list[tuple]:
    values = obj.values() if isinstance(obj, dict) else ()
    return [v[0] for v in values if isinstance(v, _Tensor)]


def _read_legacy(path: Path, handle) -> dict[str, np.ndarray]:
    if _Unpickler(handle, path).load() != LEGACY_MAGIC:
        raise _bad(path, "no torch magic number")
    if _Unpickler(handle, path).load() != LEGACY_PROTOCOL:
        raise _bad(path, "an unknown torch protocol version")
    info = _Unpickler(handle, path).load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise _bad(path, "written on a big-endian machine")
    obj = _Unpickler(handle, path).load()
    keys = _Unpickler(handle, path).load()
    kinds = {key: kind for _, kind, key, _ in _storages_of(obj)}
    buffers = {}
    for key in keys:
        if key not in kinds:
            raise _bad(path, f"storage {key} is not used by any tensor")
        dtype = STORAGE_DTYPES[kinds[key]]
        head = handle.read(8)
        if len(head) != 8:
            raise _bad(path, "truncated")
        (count,) = struct.unpack("<q", head)
        data = handle.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise _bad(path, "truncated")
        buffers[key] = np.frombuffer(data, dtype)
    return _tensors(path, obj, buffers)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise _bad(path, "a zip without one data.pkl")
        root = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as handle:
            obj = _Unpickler(io.BytesIO(handle.read()), path).load()
        buffers = {}
        for _, kind, key, count in _storages_of(obj):
            member = f"{root}data/{key}"
            if member not in names:
                raise _bad(path, f"its storage {member} is missing")
            buffers[key] = np.frombuffer(archive.read(member), STORAGE_DTYPES[kind])[:count]
    return _tensors(path, obj, buffers)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array of a ``.pth`` state dict (either layout); refuses any global outside ALLOWED_GLOBALS."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as handle:
            return _read_legacy(path, handle)
    except GraftlineError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, struct.error, zipfile.BadZipFile) as exc:
        raise _bad(path, f"{type(exc).__name__}: {exc}") from None

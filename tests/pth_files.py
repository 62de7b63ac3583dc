"""Write ``.pth`` files in torch's two layouts without PyTorch (it is no dependency of graftline).

The pickles name the same globals torch writes (``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage``...): stand-in modules are put in ``sys.modules`` only while pickling,
so pickle can name them, and removed after.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


@contextlib.contextmanager
def _torch_names():
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    """Pickles as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, rebuild, storage: _Storage, size, stride):
        self.rebuild, self.storage, self.size, self.stride = rebuild, storage, size, stride

    def __reduce__(self):
        return self.rebuild, (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())


def _pickle(obj, torch, storages: dict[str, np.ndarray]) -> bytes:
    def persistent_id(value):
        if isinstance(value, _Storage):
            kind = getattr(torch, STORAGE_NAMES[value.array.dtype])
            return ("storage", kind, value.key, "cpu", value.array.size)
        return None

    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return out.getvalue()


def _state(tensors: dict[str, np.ndarray], utils, transposed: bool):
    """OrderedDict of stand-in tensors and their storages; ``transposed`` stores 2-D arrays column-major
    (a non-contiguous tensor, as converted checkpoints hold)."""
    state, storages = collections.OrderedDict(), {}
    for i, (name, array) in enumerate(tensors.items()):
        key = str(1000 + i)
        if transposed and array.ndim == 2:
            flat = np.ascontiguousarray(array.T).ravel()
            stride = (1, array.shape[0])
        else:
            contiguous = np.array(array, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
            flat, stride = contiguous.ravel(), tuple(int(s) // array.itemsize for s in contiguous.strides)
        storages[key] = flat
        state[name] = _Tensor(utils._rebuild_tensor_v2, _Storage(key, flat), tuple(array.shape), stride)
    return state, storages


def write_legacy(path: Path, tensors: dict[str, np.ndarray], transposed: bool = False, obj=None) -> Path:
    """torch.save(..., _use_new_zipfile_serialization=False)'s layout; ``obj`` replaces the state dict."""
    with _torch_names() as (torch, utils):
        state, storages = _state(tensors, utils, transposed)
        body = _pickle(obj if obj is not None else state, torch, storages)
    with open(path, "wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, handle, protocol=2)
        handle.write(body)
        pickle.dump(sorted(storages), handle, protocol=2)
        for key in sorted(storages):
            handle.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())
    return path


def write_zip(path: Path, tensors: dict[str, np.ndarray], transposed: bool = False, obj=None) -> Path:
    """torch.save's default (zip) layout: archive/data.pkl and archive/data/<key>."""
    with _torch_names() as (torch, utils):
        state, storages = _state(tensors, utils, transposed)
        body = _pickle(obj if obj is not None else state, torch, storages)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", body)
        for key, flat in storages.items():
            archive.writestr(f"archive/data/{key}", flat.tobytes())
    return path

"""Read a PyTorch state dict saved in the legacy (non-zip) format, without torch.

Layout: five pickles in a row (magic number, protocol version, system info, the state dict,
the list of storage keys), then for each key in that list an int64 element count and the raw
little-endian storage bytes. Tensors refer to storages by persistent id and may be strided views
(e.g. channels-last conv kernels), so every tensor is rebuilt from (offset, size, stride) with
`as_strided` and copied. Unpickling is restricted to the few globals such a file needs.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from pipeline.errors import UserError

__all__ = ["TorchFileError", "load_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(UserError, ValueError):
    """The file is not a readable legacy-format torch state dict (the message says why)."""


class _StorageType:
    """Stand-in for `torch.<X>Storage`: only carries the numpy dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _StorageRef:
    """A storage named by a persistent id; its data is read after the pickles."""

    def __init__(self, stype: _StorageType, key: str, numel: int, view: tuple | None) -> None:
        self.dtype, self.key, self.numel, self.view = stype.dtype, key, numel, view


class _TensorRef:
    """A tensor awaiting its storage data: storage, element offset, size and stride."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    """Unpickler that allows only OrderedDict, tensor rebuilding and storage types."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r:.80}")
        return _StorageRef(stype, str(key), int(numel), view)


def _materialize(path: Path, ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Copy one (possibly non-contiguous) tensor out of its storage, bounds-checked."""
    st = ref.storage
    if st.key not in storages:
        raise TorchFileError(f"{path}: tensor refers to storage {st.key} that is not in the file")
    base = storages[st.key]
    if st.view is not None:  # legacy storage view: (view_key, element offset, view size)
        _vkey, voff, vsize = st.view
        base = base[int(voff) : int(voff) + int(vsize)]
    if any(s < 0 for s in ref.size + ref.stride) or ref.offset < 0 or len(ref.size) != len(ref.stride):
        raise TorchFileError(f"{path}: bad tensor geometry size={ref.size} stride={ref.stride}")
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=base.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= base.size:
        raise TorchFileError(f"{path}: tensor reaches element {last} of a {base.size}-element storage")
    view = as_strided(base[ref.offset :], shape=ref.size,
                      strides=tuple(s * base.itemsize for s in ref.stride), writeable=False)
    return np.ascontiguousarray(view).copy()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a legacy-format torch state dict as {name: numpy array}, in file order.

    Raises TorchFileError (one line naming the file) for zip-format, truncated or foreign files.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TorchFileError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if data[:4] == b"PK\x03\x04":
        raise TorchFileError(f"{path}: zip-format torch file (torch>=1.6 default); "
                             "only the legacy format is supported, re-save with "
                             "_use_new_zipfile_serialization=False")
    if data[:1] != b"\x80":
        raise TorchFileError(f"{path}: not a torch file (does not start with a pickle)")
    f = io.BytesIO(data)
    unpickler = _Unpickler(f)
    try:
        if unpickler.load() != MAGIC_NUMBER:
            raise TorchFileError(f"{path}: not a legacy torch file (wrong magic number)")
        if unpickler.load() != PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: unsupported torch protocol version")
        sys_info = unpickler.load()
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
            raise TorchFileError(f"{path}: big-endian or malformed torch file header")
        result = unpickler.load()
        keys = unpickler.load()
    except TorchFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, ValueError, ...: all mean "bad file"
        if isinstance(exc, EOFError) or f.tell() >= len(data):
            raise TorchFileError(f"{path}: truncated torch file (ends inside the pickled header)") from None
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TorchFileError(f"{path}: not a readable torch state dict ({msg})") from None
    if not isinstance(result, dict) or not isinstance(keys, list):
        raise TorchFileError(f"{path}: torch file does not hold a state dict")

    dtypes = {}
    for ref in result.values():
        if not isinstance(ref, _TensorRef):
            raise TorchFileError(f"{path}: state dict holds a non-tensor value {type(ref).__name__}")
        dtypes[ref.storage.key] = ref.storage.dtype
    storages: dict[str, np.ndarray] = {}
    pos = f.tell()
    for key in keys:
        if key not in dtypes:
            raise TorchFileError(f"{path}: storage key {key!r:.40} is used by no tensor")
        if pos + 8 > len(data):
            raise TorchFileError(f"{path}: truncated torch file (storage {key} missing)")
        (numel,) = struct.unpack_from("<q", data, pos)
        nbytes = numel * dtypes[key].itemsize
        if numel < 0 or pos + 8 + nbytes > len(data):
            raise TorchFileError(f"{path}: truncated torch file (storage {key} is cut short)")
        storages[key] = np.frombuffer(data, dtype=dtypes[key], count=numel, offset=pos + 8)
        pos += 8 + nbytes
    if pos != len(data):
        raise TorchFileError(f"{path}: {len(data) - pos} unexpected trailing bytes after the storages")
    return {str(name): _materialize(path, ref, storages) for name, ref in result.items()}

"""Reading PyTorch ``.pth`` files into numpy state dicts without importing torch.

Two container formats are supported:

* the legacy format (``torch.save`` before 1.6, or with
  ``_use_new_zipfile_serialization=False``): a sequence of pickles -- magic
  number, protocol version, system info, the main object, the list of storage
  keys -- followed by the raw storages, each an int64 element count and then
  the elements, in the order of that list;
* the zip format (torch >= 1.6): ``<name>/data.pkl`` plus one member
  ``<name>/data/<key>`` per storage.

Both pickles refer to storages through persistent ids
``('storage', storage_type, key, location, numel[, view_metadata])``.

The pickles are read with :class:`progsr_jax.interop.safe_pickle.RestrictedUnpickler`:
only the globals in :data:`ALLOWED` resolve, and none of them is a real torch
object.  Tensors become lazy records that are materialised as numpy arrays
after the storages are read; modules (``torch.nn.Conv2d``, ``fan_model.fan_squeeze``
...) become inert :class:`ModuleRecord` objects whose ``__setstate__`` only
stores the pickled attribute dict.  The state dict is then collected by
walking ``_parameters``/``_buffers``/``_modules``, as ``Module.state_dict``
does.  Any other global (``os.system``, ``builtins.eval``, an unknown class,
``torch.storage._load_from_bytes`` ...) raises :class:`UnsafePickleError`
before anything is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from progsr_jax.errors import UserError
from progsr_jax.interop.safe_pickle import RestrictedUnpickler, UnsafePickleError

__all__ = ["load_torch_file", "load_torch_object", "extract_state_dict", "ModuleRecord",
           "UnsafePickleError", "LEGACY_MAGIC"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_MAX_TENSOR_ELEMENTS = 1 << 31

# ---------------------------------------------------------------------------
# Storages and tensors


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co.: only carries the dtype."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype  # numpy dtype string without byte order, or 'bfloat16'

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

    def __repr__(self):
        return f"<storage type {self.name}>"


_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageRef:
    """A reference to (a view of) a serialized storage: ``key`` + element offset."""

    __slots__ = ("stype", "key", "offset", "numel")

    def __init__(self, stype: _StorageType, key: str, offset: int, numel: int):
        self.stype, self.key, self.offset, self.numel = stype, key, offset, numel


class _LazyTensor:
    """A tensor whose storage bytes have not been read yet."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise UnsafePickleError("malformed tensor: its storage is not a serialized storage")
        try:
            self.offset = int(offset)
            self.size = tuple(int(s) for s in size)
            self.stride = tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise UnsafePickleError("malformed tensor: bad offset/size/stride") from None
        if len(self.size) != len(self.stride) or self.offset < 0 or any(s < 0 for s in self.size):
            raise UnsafePickleError("malformed tensor: bad offset/size/stride")
        self.storage = storage


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *unused):
    return data


def _parameter(data=None, requires_grad=True):
    return data


def _torch_size(*args):
    return tuple(*args)


def _no_backend(*args, **kwargs):  # torch.nn.backends.thnn._get_thnn_function_backend
    return None


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _storage_array(stype: _StorageType, buf: bytes, byteorder: str, what: str) -> np.ndarray:
    bo = "<" if byteorder == "little" else ">"
    if len(buf) % stype.itemsize:
        raise UserError(f"{what}: a {stype.name} has {len(buf)} bytes, not a multiple of {stype.itemsize}")
    if stype.dtype == "bfloat16":
        return _bfloat16_to_float32(np.frombuffer(buf, dtype=bo + "u2"))
    return np.frombuffer(buf, dtype=bo + stype.dtype if stype.dtype not in ("?", "u1", "i1")
                         else stype.dtype)


def _materialise(t: _LazyTensor, storages: Mapping[str, np.ndarray], what: str) -> np.ndarray:
    ref = t.storage
    if ref.key not in storages:
        raise UserError(f"{what}: storage {ref.key!r} is referenced but not present in the file")
    data = storages[ref.key]
    base = ref.offset + t.offset
    numel = int(np.prod(t.size, dtype=np.int64)) if t.size else 1
    if numel == 0:
        return np.zeros(t.size, dtype=data.dtype)
    if numel > _MAX_TENSOR_ELEMENTS:
        raise UserError(f"{what}: a tensor of shape {t.size} is implausibly large")
    last = base + sum((s - 1) * st for s, st in zip(t.size, t.stride))
    lo = base + sum((s - 1) * st for s, st in zip(t.size, t.stride) if st < 0)
    if lo < 0 or last >= data.size or base >= data.size:
        raise UserError(f"{what}: a tensor reaches outside its storage {ref.key!r}")
    contiguous, acc = [], 1
    for s in reversed(t.size):
        contiguous.append(acc)
        acc *= s
    if tuple(reversed(contiguous)) == t.stride or numel == 1:
        return np.array(data[base:base + numel]).reshape(t.size)
    idx = np.full((), base, dtype=np.int64)
    for d, (s, st) in enumerate(zip(t.size, t.stride)):
        shape = [1] * len(t.size)
        shape[d] = s
        idx = idx + (np.arange(s, dtype=np.int64) * st).reshape(shape)
    return np.array(data[idx])


# ---------------------------------------------------------------------------
# Module records


class ModuleRecord:
    """An inert stand-in for a pickled ``torch.nn.Module``: it only keeps its state."""

    torch_class = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"malformed module record {self.torch_class}")
        self.__dict__["_state"] = dict(state)

    @property
    def state(self) -> dict:
        return self.__dict__.get("_state", {})

    def __repr__(self):
        return f"<ModuleRecord {self.torch_class}>"


_MODULE_CLASSES = {
    "torch.nn.modules.conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d"),
    "torch.nn.modules.batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
    "torch.nn.modules.activation": ("LeakyReLU", "ReLU", "PReLU", "Sigmoid", "Tanh"),
    "torch.nn.modules.container": ("Sequential", "ModuleList", "ModuleDict"),
    "torch.nn.modules.pooling": ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "fan_model": ("fan_squeeze",),
}


def _record_class(module: str, name: str):
    return type(name, (ModuleRecord,), {"torch_class": f"{module}.{name}", "__module__": __name__})


def _build_allow_list() -> dict:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.nn.parameter", "Parameter"): _parameter,
        ("torch", "Size"): _torch_size,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,
        ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _no_backend,
    }
    for name, dt in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dt)
        allowed[("torch.cuda", name)] = _StorageType(name, dt)
    for module, names in _MODULE_CLASSES.items():
        for name in names:
            allowed[(module, name)] = _record_class(module, name)
    return allowed


ALLOWED = _build_allow_list()
"""``(module, name) -> stand-in``: the only globals a ``.pth`` file may reference."""


class _TorchUnpickler(RestrictedUnpickler):
    def __init__(self, file, what: str):
        super().__init__(file, ALLOWED)
        self.what = what
        self.storages: dict[str, tuple[_StorageType, int]] = {}  # root key -> (type, numel)
        self.views: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except UnsafePickleError:
            raise UnsafePickleError(
                f"refusing to load {self.what}: the file references {module}.{name}, which is not "
                "an allowed PyTorch data type (a .pth file should only hold tensors, state dicts "
                "and known layer records); it may be malicious or of an unsupported kind") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], str):
            raise UnsafePickleError(f"refusing to load {self.what}: malformed persistent id")
        kind = pid[0]
        if kind == "module" and len(pid) >= 2 and isinstance(pid[1], type) \
                and issubclass(pid[1], ModuleRecord):
            return pid[1]  # legacy: ('module', class, source_file, source)
        if kind == "storage" and len(pid) in (5, 6):
            stype, key, _location, numel = pid[1:5]
            view = pid[5] if len(pid) == 6 else None
            if not isinstance(stype, _StorageType) or not isinstance(key, str) \
                    or not isinstance(numel, int) or numel < 0:
                raise UnsafePickleError(f"refusing to load {self.what}: malformed storage id")
            old = self.storages.setdefault(key, (stype, numel))
            if old[0].dtype != stype.dtype:
                raise UnsafePickleError(f"refusing to load {self.what}: storage {key} has two types")
            if view is None:
                return _StorageRef(stype, key, 0, numel)
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                    and all(isinstance(v, int) and v >= 0 for v in view[1:])):
                raise UnsafePickleError(f"refusing to load {self.what}: malformed storage view")
            vkey, off, vsize = view
            if vkey not in self.views:
                self.views[vkey] = _StorageRef(stype, key, off, vsize)
            return self.views[vkey]
        raise UnsafePickleError(f"refusing to load {self.what}: unknown persistent id {kind!r}")


# ---------------------------------------------------------------------------
# Containers


def _walk_materialise(obj, storages, what, memo=None):
    if memo is None:
        memo = {}
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, _LazyTensor):
        out = _materialise(obj, storages, what)
    elif isinstance(obj, dict):
        out = obj  # keep the instance (OrderedDict, ...); replace values in place
        memo[oid] = out
        for k in list(obj.keys()):
            obj[k] = _walk_materialise(obj[k], storages, what, memo)
    elif isinstance(obj, list):
        out = obj
        memo[oid] = out
        for i, v in enumerate(obj):
            obj[i] = _walk_materialise(v, storages, what, memo)
    elif isinstance(obj, tuple):
        out = tuple(_walk_materialise(v, storages, what, memo) for v in obj)
    elif isinstance(obj, ModuleRecord):
        out = obj
        memo[oid] = out
        _walk_materialise(obj.state, storages, what, memo)
    else:
        out = obj
    memo[oid] = out
    return out


def _load_legacy(f, what: str):
    magic = _TorchUnpickler(f, what).load()
    if magic != LEGACY_MAGIC:
        raise UserError(f"{what} is not a PyTorch file (wrong magic number)")
    protocol = _TorchUnpickler(f, what).load()
    if protocol != LEGACY_PROTOCOL:
        raise UserError(f"{what}: unsupported legacy PyTorch protocol {protocol!r}")
    sys_info = _TorchUnpickler(f, what).load()
    byteorder = "little"
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        byteorder = "big"
    main = _TorchUnpickler(f, what)
    obj = main.load()
    keys = _TorchUnpickler(f, what).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UserError(f"{what}: malformed storage key list")
    storages: dict[str, np.ndarray] = {}
    fmt = "<q" if byteorder == "little" else ">q"
    for key in keys:
        if key not in main.storages:
            raise UserError(f"{what}: storage {key!r} is listed but never referenced")
        stype, numel = main.storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise UserError(f"{what} is truncated (storage {key})")
        (count,) = struct.unpack(fmt, head)
        if count < 0 or count != numel:
            raise UserError(f"{what}: storage {key} holds {count} elements, the pickle says {numel}")
        nbytes = count * stype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise UserError(f"{what} is truncated (storage {key}: {len(buf)} of {nbytes} bytes)")
        storages[key] = _storage_array(stype, buf, byteorder, what)
    return _walk_materialise(obj, storages, what)


def _load_zip(path: str, what: str):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                raise UserError(
                    f"{what} is a TorchScript archive (torch.jit.save), not a state dict. Load it "
                    "with torch.jit.load(path) yourself, save model.state_dict() with torch.save, "
                    "and pass that file instead (for face-alignment's FAN, version 1.5 ships a "
                    "plain state dict, 2DFAN4-11f355bf06.pth.tar).")
            raise UserError(f"{what} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip() or "little"
            if byteorder not in ("little", "big"):
                raise UserError(f"{what}: unknown byte order {byteorder!r}")
        if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
            raise UserError(
                f"{what} is a TorchScript archive (torch.jit.save), not a state dict. Load it with "
                "torch.jit.load(path) yourself, save model.state_dict() with torch.save, and pass "
                "that file instead (for face-alignment's FAN, version 1.5 ships a plain state "
                "dict, 2DFAN4-11f355bf06.pth.tar).")
        unp = _TorchUnpickler(io.BytesIO(zf.read(pkls[0])), what)
        obj = unp.load()
        storages = {}
        for key, (stype, numel) in unp.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise UserError(f"{what}: storage {key!r} is missing from the archive")
            buf = zf.read(member)
            if len(buf) < numel * stype.itemsize:
                raise UserError(f"{what}: storage {key!r} is truncated")
            storages[key] = _storage_array(stype, buf[: numel * stype.itemsize], byteorder, what)
    return _walk_materialise(obj, storages, what)


def load_torch_object(path: str | os.PathLike) -> Any:
    """Unpickles a ``.pth`` file safely: tensors become numpy arrays, modules :class:`ModuleRecord`."""
    path = os.fspath(path)
    what = path
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, what)
        with open(path, "rb") as f:  # any other pickle is unpickled (restricted) and then refused
            return _load_legacy(f, what)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, ValueError,
            TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{what} is not a readable PyTorch file ({type(e).__name__}: {e})") from None


def _module_state_dict(rec: ModuleRecord, prefix: str, out: dict, what: str) -> None:
    st = rec.state
    skip = st.get("_non_persistent_buffers_set") or set()
    for coll in ("_parameters", "_buffers"):
        items = st.get(coll) or {}
        if not isinstance(items, dict):
            raise UserError(f"{what}: malformed module record {rec.torch_class}")
        for name, v in items.items():
            if v is None or (coll == "_buffers" and name in skip):
                continue
            if not isinstance(v, np.ndarray):
                raise UserError(f"{what}: {prefix}{name} is not a tensor")
            out[prefix + str(name)] = v
    for name, child in (st.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise UserError(f"{what}: submodule {prefix}{name} is not a module record")
        _module_state_dict(child, f"{prefix}{name}.", out, what)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


def extract_state_dict(obj: Any, what: str = "checkpoint") -> dict[str, np.ndarray]:
    """The flat ``{key: array}`` state dict held by ``obj`` (a state dict, module, or wrapper dict)."""
    if isinstance(obj, ModuleRecord):
        out: dict[str, np.ndarray] = {}
        _module_state_dict(obj, "", out, what)
        return out
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (dict, ModuleRecord)):
                return extract_state_dict(obj[key], what)
        keys = list(obj.keys())[:8]
        raise UserError(f"{what} holds a dict with keys {keys}, not a state dict "
                        f"(looked for {', '.join(_WRAPPER_KEYS)})")
    raise UserError(f"{what} holds a {type(obj).__name__}, not a state dict or module")


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a ``.pth`` file as a flat state dict of numpy arrays, without torch.

    Accepts plain state dicts, wrapper dicts (``{'state_dict': ...}``,
    ``{'model_state_dict': ...}``, ...) and whole-module pickles of known
    layer types.  Raises :class:`UnsafePickleError` for files that reference
    anything else and :class:`UserError` for unreadable files.
    """
    return extract_state_dict(load_torch_object(path), what=os.fspath(path))

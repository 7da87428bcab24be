"""Restricted unpickling: rebuild plain data, refuse everything else.

``pickle.load`` runs whatever callables a file names.  The loaders here only
resolve the globals on an explicit allow-list; any other global (``os.system``,
``builtins.eval``, an unknown class, ...) raises :class:`UnsafePickleError`
before anything is called.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable, Mapping

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list."""


def _numpy_reconstruct():
    try:  # numpy >= 2 keeps the pickled name numpy.core.multiarray for old files
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed[(module, name)]`` globals."""

    def __init__(self, file, allowed: Mapping[tuple[str, str], Any], **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = dict(allowed)

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load: the file references {module}.{name}, "
                "which is not an allowed data type") from None


def load_numpy_pickle(path: str, extra: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Loads a pickle of dicts/lists of numpy arrays without running foreign code."""
    allowed = _numpy_reconstruct()
    if extra:
        allowed.update(extra)
    with open(path, "rb") as f:
        return RestrictedUnpickler(io.BufferedReader(f), allowed).load()


AllowList = Mapping[tuple[str, str], Callable[..., Any]]

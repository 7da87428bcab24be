"""One-to-one mapping between PyTorch state dicts and Flax variable trees.

The rule is mechanical.  A PyTorch key is split on dots and every numeric
token is joined to the token before it with an underscore; the last token is
the variable name::

    step1.3.conv.0.conv.weight_orig  <->  params/step1_3/conv_0/conv/weight_orig
    step1.3.conv.1.running_mean      <->  batch_stats/step1_3/conv_1/running_mean
    to_rgb.2.weight                  <->  params/to_rgb_2/weight

``running_mean``/``running_var`` live in the ``batch_stats`` collection,
everything else in ``params``; ``num_batches_tracked`` is not kept (it only
matters for BatchNorm with ``momentum=None``).  Layouts: 4-D conv weights
OIHW <-> HWIO, transposed-conv weights (in, out, kh, kw) <-> (kh, kw, in, out),
linear weights (out, in) <-> (in, out).  A transposed conv is recognised by
the Flax module's name (listed in ``conv_transpose``).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from progsr_jax.errors import UserError

STATS = ("running_mean", "running_var")
IGNORED = ("num_batches_tracked",)


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``'step1.3.conv.0.conv.weight_orig'`` -> ``('step1_3', 'conv_0', 'conv', 'weight_orig')``."""
    out: list[str] = []
    for tok in key.split("."):
        if tok.isdigit() and out:
            out[-1] = f"{out[-1]}_{tok}"
        else:
            out.append(tok)
    return tuple(out)


def path_to_torch_key(path: Iterable[str]) -> str:
    parts = []
    for tok in path:
        head, _, tail = tok.rpartition("_")
        if head and tail.isdigit():
            parts.extend([head, tail])
        else:
            parts.append(tok)
    return ".".join(parts)


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _to_flax_layout(arr: np.ndarray, path: tuple[str, ...], conv_transpose: set[str]) -> np.ndarray:
    if arr.ndim == 4:
        if any(p in conv_transpose for p in path):
            return np.transpose(arr, (2, 3, 0, 1))  # (in, out, kh, kw) -> (kh, kw, in, out)
        return np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO
    if arr.ndim == 2:
        return np.transpose(arr)  # (out, in) -> (in, out)
    return arr


def _to_torch_layout(arr: np.ndarray, path: tuple[str, ...], conv_transpose: set[str]) -> np.ndarray:
    if arr.ndim == 4:
        if any(p in conv_transpose for p in path):
            return np.transpose(arr, (2, 3, 0, 1))
        return np.transpose(arr, (3, 2, 0, 1))
    if arr.ndim == 2:
        return np.transpose(arr)
    return arr


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], reference: Mapping,
                            conv_transpose: Iterable[str] = (), what: str = "checkpoint",
                            strip_prefix: str = "module.") -> dict:
    """Converts a PyTorch state dict into Flax variables shaped like ``reference``.

    ``reference`` is the variable tree of the Flax model (e.g. from ``init``)
    with ``params`` and optionally ``batch_stats``.  Missing or unexpected keys
    and shape mismatches raise :class:`UserError` naming the keys; nothing is
    silently ignored (unlike ``load_state_dict(strict=False)``).
    """
    conv_transpose = set(conv_transpose)
    sd = dict(state_dict)
    if sd and strip_prefix and all(k.startswith(strip_prefix) for k in sd):
        sd = {k[len(strip_prefix):]: v for k, v in sd.items()}
    expected = {}
    for coll, tree in reference.items():
        for path, leaf in _flatten(tree).items():
            expected[path_to_torch_key(path)] = (coll, path, tuple(np.shape(leaf)))
    given = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in IGNORED}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise UserError(f"{what} does not match the model ({len(expected)} keys expected): "
                        + "; ".join(parts))
    out: dict = {}
    for key, (coll, path, shape) in expected.items():
        arr = np.asarray(given[key], dtype=np.float32)
        arr = _to_flax_layout(arr, path, conv_transpose)
        if tuple(arr.shape) != shape:
            raise UserError(f"{what}: key {key!r} has shape {tuple(np.shape(given[key]))}, "
                            f"which does not fit the model (expected {shape} in Flax layout); "
                            "is it from another architecture or width?")
        _set(out.setdefault(coll, {}), path, arr)
    return out


def variables_to_state_dict(variables: Mapping, conv_transpose: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The inverse of :func:`state_dict_to_variables` (``num_batches_tracked`` omitted)."""
    conv_transpose = set(conv_transpose)
    sd = {}
    for tree in variables.values():
        for path, leaf in _flatten(tree).items():
            sd[path_to_torch_key(path)] = _to_torch_layout(np.asarray(leaf), path, conv_transpose)
    return sd

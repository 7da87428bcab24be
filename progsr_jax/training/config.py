"""Config files and the one validator style both trainers share.

The recipes live in ``configs/*.py`` (the paper's numbers, the ``:cpu``,
``:demo`` and ``:smoke`` variants); the package only finds and checks them.
``configs/`` stays at the top of the repository (``--config=configs/step3.py``
from a checkout reads that file), and the wheel ships the same files as
``progsr_jax/configs/`` (``[tool.setuptools.package-dir]`` in
pyproject.toml), so that a ``pip install .`` / ``pip install git+...``
finds them too: :func:`resolve` maps a recipe name that does not exist on
disk -- a bare ``step3.py`` or ``configs/step3.py``, with or without a
``:variant`` -- to the recipe of the checkout or, failing that, of the
installed package.
:func:`load` reads a config file the way ``--config=FILE[:variant]`` does,
for code and tests that need a recipe without a command line, and for
``configs/step1.py`` / ``step2.py``, which are ``step3.py`` stopped earlier.

A validator is a function ``validate(config, num_devices)`` built from the
:class:`Checks` below, so that every invalid value is reported the same way:
``invalid config: <field> must be ..., got <value>``.
"""

from __future__ import annotations

import os
import runpy
from typing import Any, Iterable

import jax
import ml_collections

from progsr_jax.errors import UserError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: ``configs/`` of a source checkout (beside the package), then the installed copy.
CONFIG_DIRS = (os.path.join(os.path.dirname(_PACKAGE), "configs"),
               os.path.join(_PACKAGE, "configs"))


def resolve(path: str) -> str:
    """``path`` itself when it exists; else, for ``NAME.py`` or ``configs/NAME.py`` (a
    ``:variant`` suffix is kept), the first recipe of that name in :data:`CONFIG_DIRS`;
    else ``path`` unchanged (the caller reports it missing)."""
    file, sep, variant = path, "", ""
    if ":" in os.path.basename(path):
        file, variant = path.rsplit(":", 1)
        sep = ":"
    if os.path.exists(file) or os.path.dirname(os.path.normpath(file)) not in ("", "configs"):
        return path
    for directory in CONFIG_DIRS:
        candidate = os.path.join(directory, os.path.basename(file))
        if os.path.isfile(candidate):
            return candidate + sep + variant
    return path


#: ``configs/`` of a source checkout (the package's parent folder).
CONFIG_DIR = CONFIG_DIRS[0]


def load(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of a config file.

    ``path`` is a file name, or a recipe name such as ``"step3.py"`` or
    ``"configs/step3.py"`` that does not exist on disk, looked up in the
    checkout's ``configs/`` and then in the installed package
    (:func:`resolve`).  A ``"file.py:variant"`` suffix is
    accepted too.
    """
    if variant is None and ":" in os.path.basename(path):
        path, variant = path.rsplit(":", 1)
    path = resolve(path)
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(variant) if variant is not None else get_config()


def sibling(config_file: str, name: str, variant: str | None) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of the config file ``name`` beside ``config_file``."""
    return load(os.path.join(os.path.dirname(os.path.abspath(config_file)), name), variant)


def data_config(config, split: str | None = None) -> ml_collections.ConfigDict:
    """``config.data`` plus the run's ``seed`` (and another ``split``), as
    :func:`progsr_jax.data.build_dataset` reads them."""
    c = ml_collections.ConfigDict(config.data.to_dict())
    c.seed = config.seed
    if split is not None:
        c.split = split
    return c


def unknown_variant(variant: str, known: Iterable[str]) -> UserError:
    return UserError(f"unknown variant {variant!r} (use {', '.join(known)})")


class Checks:
    """One-line checks of config fields, addressed by dotted name (``"loss.pixel"``)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def get(self, name: str) -> Any:
        node = self.config
        for part in name.split("."):
            node = node[part]
        return node

    @staticmethod
    def fail(message: str) -> None:
        raise UserError(f"invalid config: {message}")

    def positive_int(self, *names: str, allow_none: bool = False) -> None:
        for name in names:
            v = self.get(name)
            if v is None and allow_none:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                self.fail(f"{name} must be a positive integer"
                          f"{' or None' if allow_none else ''}, got {v!r}")

    def positive(self, *names: str, allow_none: bool = False) -> None:
        for name in names:
            v = self.get(name)
            if v is None and allow_none:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                self.fail(f"{name} must be > 0, got {v!r}")

    def non_negative(self, *names: str) -> None:
        for name in names:
            v = self.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                self.fail(f"{name} must be a non-negative number, got {v!r}")

    def one_of(self, name: str, choices: Iterable[Any]) -> None:
        choices = tuple(choices)
        v = self.get(name)
        if v not in choices:
            self.fail(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")

    def in_range(self, name: str, lo: float, hi: float) -> None:
        """``lo <= value < hi``."""
        v = self.get(name)
        if not isinstance(v, (int, float)) or not lo <= v < hi:
            self.fail(f"{name} must be in [{lo}, {hi}), got {v!r}")

    def batch(self, num_devices: int, name: str = "batch_size") -> None:
        """A global batch of at least 2 (BatchNorm in training mode) that the devices split."""
        self.positive_int(name)
        v = self.get(name)
        if v < 2:
            self.fail(f"{name} must be at least 2 (BatchNorm in training mode needs two "
                      "samples)")
        if v % num_devices:
            where = (f" ({jax.local_device_count()} on each of {jax.process_count()} processes)"
                     if jax.process_count() > 1 else "")
            fit = max(num_devices, v - v % num_devices)
            self.fail(f"{name} {v} is not divisible by the {num_devices} devices{where}; set "
                      f"--config.{name} to a multiple of {num_devices} (e.g. {fit} or "
                      f"{fit + num_devices})")

    def workers(self, name: str = "data.workers") -> None:
        """The input pipeline's worker processes: an integer >= 0, or -1 (auto)."""
        v = self.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < -1:
            self.fail(f"{name} must be an integer >= 0 (0: in-process) or -1 (auto), got {v!r}")

    def data_source(self, sources: Iterable[str],
                    need_root: Iterable[str] = ("celeba", "folder")) -> None:
        """``data.source`` is known; the sources in ``need_root`` need ``data.root``."""
        self.one_of("data.source", sources)
        source = self.get("data.source")
        if source in tuple(need_root) and not self.get("data.root"):
            self.fail(f"data.source={source!r} needs --config.data.root=<folder>")

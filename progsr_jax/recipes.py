"""Where the recipes (``configs/*.py``) are, in a source checkout and in any install.

``configs/`` stays at the top of the repository (``--config=configs/step3.py``
from a checkout reads that file), and the wheel ships the same files as
``progsr_jax/configs/`` (``[tool.setuptools.package-dir]`` in
pyproject.toml), so that a ``pip install .`` / ``pip install git+...``
finds them too.  :func:`resolve` maps a recipe name that does not exist on
disk -- a bare ``step3.py`` or ``configs/step3.py``, with or without a
``:variant`` -- to the recipe of the checkout or, failing that, of the
installed package.
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
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

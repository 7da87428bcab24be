"""Shared test fixtures.

Real data and weights live in ``../shared`` beside the repository (override
with ``PROGSR_SHARED=/path``).  Tests that need them skip with a clear reason
when they are absent, so a fresh clone still passes.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PROGSR_SHARED", REPO.parent / "shared"))


def _need(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set PROGSR_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    return _need(SHARED, "shared data folder")


@pytest.fixture(scope="session")
def celeba_root() -> pathlib.Path:
    return _need(SHARED / "data" / "celeba", "CelebA subset")


@pytest.fixture(scope="session")
def faces68_root() -> pathlib.Path:
    return _need(SHARED / "data" / "faces68", "faces68 landmark data")


@pytest.fixture(scope="session")
def distilled_fan_file() -> pathlib.Path:
    return _need(SHARED / "weights" / "distilled_fan" / "compressed_model_011000.pth",
                 "released distilled FAN weights")

"""A wheel install finds its recipes: build, install in a fresh venv, run from elsewhere.

The wheel is built from a copy of the checkout (``pip wheel --no-deps``) and
installed with ``--no-deps`` into a new virtual environment that sees this
interpreter's packages (jax, flax, ... are not reinstalled: nothing is
downloaded) but not this checkout nor an editable install of it: the test
first checks that ``progsr_jax`` is imported from the new venv.  Then, from a
temporary folder outside the checkout and without ``PYTHONPATH``, it runs
``python -m progsr_jax.bench`` (which reads ``step3.py``) at its smallest
setting and ``python -m progsr_jax.main --config=configs/step3.py:smoke``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def run(cmd, cwd, env, timeout=900):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_install_finds_the_recipes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("progsr_jax", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
         "-w", tmp_path / "dist"], src, env)
    wheel, = (tmp_path / "dist").glob("progsr_jax-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, env)
    python = venv / "bin" / "python"
    # The new venv's base is the system Python; this interpreter's packages (jax, ...) are
    # added as plain paths: .pth files inside them (an editable install's finder) are not run.
    venv_site = pathlib.Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 tmp_path, env).stdout.strip())
    parents = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
               if os.path.isdir(p)]
    (venv_site / "_progsr_test_parent.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], tmp_path, env)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run([python, "-c", "import progsr_jax; print(progsr_jax.__file__)"], cwd, env)
    assert pathlib.Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout
    assert not (cwd / "configs").exists()

    bench = run([python, "-m", "progsr_jax.bench", "--stage=1", "--batch_size=2", "--steps=1",
                 "--warmup=0", "--width=0.125", "--nofan"], cwd, env)
    line = json.loads(bench.stdout.strip().splitlines()[-1])
    assert line["framework"] == "jax" and line["images_per_sec"] > 0

    workdir = tmp_path / "run"
    run([python, "-m", "progsr_jax.main", "--config=configs/step3.py:smoke",
         f"--workdir={workdir}"], cwd, env, timeout=1800)
    assert json.loads((workdir / "config.json").read_text())["data"]["source"] == "synthetic"
    assert any((workdir / "checkpoints").iterdir())
    # the same recipe by bare name through the library
    loaded = run([python, "-c", "from progsr_jax.training import config; "
                  "print(config.load('step3.py:smoke').batch_size)"], cwd, env)
    assert int(loaded.stdout.strip()) >= 2

#!/usr/bin/env bash
# The one test command: installs what the tests need into a fresh virtual environment
# (.venv-test beside this checkout) and runs the whole suite, slow tests included.
#
#   bash tests/run_all_tests.sh                 # everything (~24 min on 2 CPU cores)
#   bash tests/run_all_tests.sh -m "not slow"   # extra arguments go to pytest
#   REUSE_VENV=1 bash tests/run_all_tests.sh    # keep an existing .venv-test (faster reruns)
#
# What it installs, and why some of it goes in with --no-deps:
# * torch==2.13.0 first: the CPU build (any other request may pull a CUDA build of several GB);
# * the package with its dev, torch, tfds, export and video extras;
# * jax2onnx (the ONNX converter; its metadata pins an older orbax-checkpoint), and
#   facenet-pytorch (only its MTCNN weight files are read; its metadata pins torch<2.3 and
#   numpy<2), both --no-deps; face-alignment's FAN definition for one parity test (it skips
#   where the package is missing).
# Real data and weights are looked for in ../shared (PROGSR_SHARED overrides); tests that
# need them skip with the reason when absent.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv-test}"
if [[ "${REUSE_VENV:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev,torch,tfds,export,video]'
python -m pip install -q --no-deps jax2onnx==0.17.1 facenet-pytorch==2.6.0
python -m pip install -q --no-deps face-alignment==1.5.0 \
  || echo "face-alignment is not installable here; its parity test will skip"

export PROGSR_SHARED="${PROGSR_SHARED:-$(cd .. && pwd)/shared}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python -m pytest -q -p no:cacheprovider --durations=30 "$@"

#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the right torch build:
# the CPU build where there is no NVIDIA GPU (a plain `torch` requirement pulls a
# multi-GB CUDA build), the CUDA builds (torch, jax[cuda12]) where there is one.
# Idempotent: a finished install is recorded in .venv/.setup-done and skipped next time.
# Source it (`. scripts/setup.sh`) to get the virtual environment activated.
#
# Environment: PYTHON (interpreter, default python3.11 or python3), JAXLM_GPU=0/1
# (force the CPU or GPU install), JAXLM_WHEELS=DIR (install offline from wheels in DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"

if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
if [ -z "${JAXLM_GPU:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    JAXLM_GPU=1
  else
    JAXLM_GPU=0
  fi
fi
stamp="gpu=$JAXLM_GPU torch=$TORCH_VERSION $(cat "$ROOT/pyproject.toml" "$ROOT/requirements-lock.txt" | sha1sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
if [ "$(cat "$VENV/.setup-done" 2>/dev/null)" != "$stamp" ]; then
  offline=()
  if [ -n "${JAXLM_WHEELS:-}" ]; then offline=(--no-index --find-links "$JAXLM_WHEELS"); fi
  # pip byte-compiles one file at a time; --no-compile and one compileall over all cores
  # at the end saves ~20 s of a fresh set-up on 2 cores (imports need the .pyc files:
  # with PYTHONDONTWRITEBYTECODE set, nothing would write them later)
  "${PIP[@]}" install -q "${offline[@]}" --upgrade pip >&2 || true
  if [ "$JAXLM_GPU" = 1 ]; then
    echo "[setup] NVIDIA GPU found: installing CUDA builds of torch and jax" >&2
    "${PIP[@]}" install -q --no-compile "${offline[@]}" "torch==$TORCH_VERSION" >&2
    extras="dev,gpu"
  else
    echo "[setup] no GPU: installing the CPU build of torch $TORCH_VERSION" >&2
    # A local CPU wheel (pip's find-links) first (its dependencies come with the project
    # below); else PyTorch's CPU index.
    if ! "${PIP[@]}" install -q --no-compile --no-index --no-deps "torch==$TORCH_VERSION" \
        >&2 2>/dev/null; then
      "${PIP[@]}" install -q --no-compile "${offline[@]}" "torch==$TORCH_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple >&2
    fi
    extras="dev"
  fi
  echo "[setup] installing the project (.[${extras}]) with pinned versions" >&2
  "${PIP[@]}" install -q --no-compile "${offline[@]}" -c "$ROOT/requirements-lock.txt" \
    -e "$ROOT[$extras]" >&2
  echo "[setup] byte-compiling the installed packages" >&2
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$VENV/bin/python" -m compileall -qq -j 0 "$site" >/dev/null 2>&1 || true
  echo "$stamp" > "$VENV/.setup-done"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

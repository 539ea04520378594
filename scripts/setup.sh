#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the right torch build:
# the CPU build where there is no NVIDIA GPU (a plain `torch` requirement pulls a
# multi-GB CUDA build), the CUDA builds (torch, jax[cuda12]) where there is one.
# Idempotent: a finished install is recorded in .venv/.setup-done (the pins' hash, then
# the optional extras installed with them) and skipped next time.
# Source it (`. scripts/setup.sh`) to get the virtual environment activated.
#
# Environment: PYTHON (interpreter, default python3.11 or python3), JAXLM_GPU=0/1
# (force the CPU or GPU install), JAXLM_WHEELS=DIR (install offline from wheels in DIR),
# JAXLM_NO_UV=1 (install the project with pip instead of uv), JAXLM_EXTRAS=a,b (optional
# extras of pyproject.toml to install as well; scripts/test.sh asks for `hf` and `wandb`).
# Extras installed once stay recorded, so a later call without them (scripts/run.sh)
# installs nothing; a change of the pins reinstalls only what that call asks for.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"
UV_VERSION="0.13.9"

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

_setup_extras() {  # comma list -> sorted unique comma list
  printf '%s\n' "${1//,/$'\n'}" | sed '/^$/d' | sort -u | paste -sd, -
}
asked="$(_setup_extras "${JAXLM_EXTRAS:-}")"
case ",$asked," in *[!a-z0-9_,-]*)
  echo "[setup] JAXLM_EXTRAS=${JAXLM_EXTRAS:-}: expected extra names such as hf" >&2
  return 2 2>/dev/null || exit 2 ;;
esac
done_stamp="$(sed -n 1p "$VENV/.setup-done" 2>/dev/null || true)"
have=""
if [ "$done_stamp" = "$stamp" ]; then
  have="$(sed -n 's/^extras=//p' "$VENV/.setup-done" 2>/dev/null || true)"
fi
want="$(_setup_extras "$have,$asked")"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
offline=()
if [ -n "${JAXLM_WHEELS:-}" ]; then offline=(--no-index --find-links "$JAXLM_WHEELS"); fi
# The pinned project goes in through uv (PyPI's `uv`, fetched into .venv in ~2 s), which
# downloads and unpacks in parallel: ~9 s here against pip's 24-42 s, cold cache or warm.
# pip stays for torch (the local CPU wheel) and is the fallback: offline
# (JAXLM_WHEELS), JAXLM_NO_UV=1, or when uv cannot be had.
install_pinned() {  # install_pinned EXTRAS: the project with its pins, no byte-compiling
  if [ -z "${JAXLM_WHEELS:-}" ] && [ "${JAXLM_NO_UV:-0}" != 1 ] && { [ -x "$VENV/bin/uv" ] \
      || "${PIP[@]}" install -q --no-compile "uv==$UV_VERSION" >&2 2>/dev/null; }; then
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" \
      -c "$ROOT/requirements-lock.txt" -e "$ROOT[$1]" >&2 && return 0
    echo "[setup] uv failed; installing with pip" >&2
  fi
  "${PIP[@]}" install -q "${offline[@]}" --upgrade pip >&2 || true
  "${PIP[@]}" install -q --no-compile "${offline[@]}" -c "$ROOT/requirements-lock.txt" \
    -e "$ROOT[$1]" >&2
}
base_extras="dev"
if [ "$JAXLM_GPU" = 1 ]; then base_extras="dev,gpu"; fi
if [ "$done_stamp" != "$stamp" ]; then
  # pip byte-compiles one file at a time and every file; --no-compile, then one pass
  # over all cores at the end (imports need the .pyc files: with PYTHONDONTWRITEBYTECODE
  # set, nothing would write them later). Without extras (scripts/run.sh) only the
  # folders the main job imports (scripts/hot-modules.txt, ~40% of the files: ~20 s less
  # on 2 cores); with extras (scripts/test.sh) everything, since the tests import more.
  if [ "$JAXLM_GPU" = 1 ]; then
    echo "[setup] NVIDIA GPU found: installing CUDA builds of torch and jax" >&2
    "${PIP[@]}" install -q --no-compile "${offline[@]}" "torch==$TORCH_VERSION" >&2
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
  fi
  extras="$base_extras${want:+,$want}"
  echo "[setup] installing the project (.[${extras}]) with pinned versions" >&2
  install_pinned "$extras"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ -z "$want" ]; then
    "$VENV/bin/python" "$ROOT/scripts/precompile.py" "$site" || true
    # the project's own packages too (an editable install: not in site-packages)
    "$VENV/bin/python" -m compileall -qq -j 0 "$ROOT"/{lmspec,jaxlm,torchlm,parity} \
      >/dev/null 2>&1 || true
  else
    echo "[setup] byte-compiling the installed packages" >&2
    "$VENV/bin/python" -m compileall -qq -j 0 "$site" >/dev/null 2>&1 || true
  fi
  printf '%s\nextras=%s\n' "$stamp" "$want" > "$VENV/.setup-done"
elif [ "$want" != "$have" ]; then
  echo "[setup] installing the optional extras ($want) with pinned versions" >&2
  install_pinned "$base_extras,$want"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$VENV/bin/python" -m compileall -qq -j 0 "$site" >/dev/null 2>&1 || true
  printf '%s\nextras=%s\n' "$stamp" "$want" > "$VENV/.setup-done"
fi
unset -f _setup_extras install_pinned
# shellcheck disable=SC1091
. "$VENV/bin/activate"

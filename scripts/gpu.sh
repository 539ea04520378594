#!/usr/bin/env bash
# One command for a GPU machine: set-up, versions, the parity run of `tiny` on the GPU, and
# `parity bench` in bf16 at seq_len 2048 (llama-125m, llama-350m, llama-1b; JAX vs DeepSpeed
# ZeRO-2 and ZeRO-3). Figures, hardware and versions go to docs/benchmarks.md.
#
#   scripts/gpu.sh --prepare        on a machine with network: gather the wheels a GPU machine
#                                   without network lacks (deepspeed built with DS_BUILD_OPS=0,
#                                   hjson, pydantic, tensorboardX) into .whl/ (git-ignored)
#   scripts/gpu.sh [PHASE ...]      on the GPU machine; phases: env, test, parity, bench
#                                   (default: all four, in that order; about 20 minutes on 1x H100)
#
# Set-up on the GPU machine: where .whl/ holds wheels, they are installed offline into
# $GPU_SITE (default /tmp/jaxlm-site) beside the interpreter's preinstalled jax/torch/flax
# (PYTHON, default python3); otherwise scripts/setup.sh (needs network) makes .venv.
# Environment: GPU_OUT (results folder, default reports/gpu), BENCH_MODELS (default
# "llama-125m llama-350m llama-1b"), BENCH_STEPS (default 30), BENCH_ZERO (default 2,3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHL="$ROOT/.whl"
# Versions pinned as in requirements-lock.txt; deepspeed is only published as an sdist.
WHEELS=(hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
        typing-inspection==0.4.5 tensorboardX==2.6.5 py-cpuinfo==9.0.0)
DS_VERSION=0.19.8

prepare() {
  mkdir -p "$WHL"
  local py="${PYTHON:-python3}"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "${WHEELS[@]}"
  if ! ls "$WHL"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
    # building the sdist imports torch: use the project's .venv (made by scripts/setup.sh)
    [ -x "$ROOT/.venv/bin/python" ] || bash "$ROOT/scripts/setup.sh"
    local src
    src="$(mktemp -d)"
    "$ROOT/.venv/bin/python" -m pip download -q --no-deps --no-binary=:all: -d "$src" \
      "deepspeed==$DS_VERSION"
    DS_BUILD_OPS=0 "$ROOT/.venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
      -w "$WHL" "$src"/deepspeed-"$DS_VERSION".tar.gz
    rm -rf "$src"
  fi
  echo "[gpu] wheels in $WHL:" >&2
  ls -1 "$WHL" >&2
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit 0
fi

# ------------------------------------------------------------------ set-up on the GPU machine
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  PY="${PYTHON:-python3}"
  SITE="${GPU_SITE:-/tmp/jaxlm-site}"
  if [ ! -f "$SITE/.done" ]; then
    echo "[gpu] installing $(ls "$WHL" | wc -l) wheels offline into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHL"/*.whl
    touch "$SITE/.done"
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  # shellcheck disable=SC1091
  . "$ROOT/scripts/setup.sh"
  PY=python
fi
export PYTHONUNBUFFERED=1
OUT_DIR="${GPU_OUT:-$ROOT/reports/gpu}"
mkdir -p "$OUT_DIR"
MODELS="${BENCH_MODELS:-llama-125m llama-350m llama-1b}"
STEPS="${BENCH_STEPS:-30}"
ZERO="${BENCH_ZERO:-2,3}"
parity() { "$PY" -c "import sys; from parity.cli import main; sys.argv[0]='parity'; main()" "$@"; }

phase_env() {
  "$PY" -m parity.gpu_env | tee "$OUT_DIR/env.json"
}

phase_test() {
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT_DIR/pytest-gpu.log"
}

phase_parity() {
  # one GPU: DeepSpeed at world size 1, JAX on the one device; fp32 without TF32 (both
  # trainers set it), bf16; ZeRO 1-3
  set +e
  parity run configs/tiny.yaml zero.world_size=1 --out "$OUT_DIR/parity-tiny" \
    2>&1 | tee "$OUT_DIR/parity-tiny.log"
  set -e
}

phase_bench() {
  local m
  for m in $MODELS; do
    echo "[gpu] bench $m (bf16, seq 2048, ZeRO $ZERO, $STEPS steps)" >&2
    parity bench "configs/$m.yaml" train.precision=bf16 data.seq_len=2048 \
      --steps "$STEPS" --zero-stages "$ZERO" --json "$OUT_DIR/bench-$m.json" \
      2>&1 | tee "$OUT_DIR/bench-$m.log" || echo "[gpu] bench $m failed" >&2
  done
  "$PY" -m parity.benchmarks_md "$OUT_DIR" docs/benchmarks.md
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(env test parity bench)
for p in "${phases[@]}"; do
  case "$p" in
    env|test|parity|bench) echo "[gpu] phase $p ($(date -u +%H:%M:%S))" >&2; "phase_$p" ;;
    *) echo "scripts/gpu.sh: unknown phase '$p' (env, test, parity, bench, or --prepare)" >&2
       exit 2 ;;
  esac
done

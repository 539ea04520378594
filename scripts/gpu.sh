#!/usr/bin/env bash
# One command for a GPU machine: set-up, versions, the GPU tests, the parity run of `tiny` on
# the GPU, and `parity bench` in bf16 at seq_len 2048 (llama-125m, llama-350m, llama-1b; JAX
# vs DeepSpeed ZeRO-2 and ZeRO-3 under DeepSpeed's `bench` profile). Results go to $GPU_OUT;
# docs/benchmarks.md is regenerated from them after every call (parity.benchmarks_md).
#
#   scripts/gpu.sh --prepare        on a machine with network: gather the wheels a GPU machine
#                                   without network lacks (deepspeed built with DS_BUILD_OPS=0,
#                                   hjson, pydantic, pydantic-core, annotated-types,
#                                   typing-inspection, tensorboardX, py-cpuinfo, pytest) into
#                                   .whl/ (git-ignored)
#   scripts/gpu.sh [PHASE ...]      on the GPU machine; phases, in the order given:
#       env     python -m parity.gpu_env -> env.json (date, versions, GPU, driver)
#       test    pytest -m gpu -> pytest-gpu.log
#       parity  parity run configs/tiny.yaml zero.world_size=1 (fp32 with TF32 off and bf16,
#               ZeRO 1-3; one GPU = DeepSpeed world size 1) -> parity-tiny/
#       bench   parity bench per model in $BENCH_MODELS -> bench-<model>.json / .log
#     (default: env test parity bench; about 20 minutes on 1x H100)
#   scripts/gpu.sh --help
#
# Each phase, and each bench model, can run as its own call (e.g. when one command may run
# at most 10 minutes): `scripts/gpu.sh env test`, `scripts/gpu.sh parity`,
# `BENCH_MODELS=llama-1b scripts/gpu.sh bench`; results accumulate in $GPU_OUT.
#
# Set-up on the GPU machine: where .whl/ holds wheels, they are installed offline (pip
# --no-index --no-deps --target) into $GPU_SITE (default /tmp/jaxlm-site), put on PYTHONPATH
# beside the interpreter's preinstalled jax/torch/flax ($PYTHON, default python3); the
# install is skipped when the same wheels are already there. Without .whl/, scripts/setup.sh
# (needs network) makes .venv.
# Environment: GPU_BUILD_PYTHON (--prepare: the Python with torch that builds the deepspeed
# wheel, default .venv/bin/python), GPU_OUT (results, default reports/gpu), BENCH_MODELS (default "llama-125m
# llama-350m llama-1b"), BENCH_STEPS (default 20), BENCH_ZERO (default 2,3), BENCH_PROFILE
# (default bench), GPU_ALLOW_CPU=1 (run parity/bench without a GPU), GPU_DRY_RUN=1 (print
# the commands of the phases instead of running them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHL="$ROOT/.whl"
# Versions pinned as in requirements-lock.txt; deepspeed is published only as an sdist.
WHEELS=(hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
        typing-inspection==0.4.5 tensorboardX==2.6.5 py-cpuinfo==9.0.0
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1)
DS_VERSION=0.19.8
PHASES=(env test parity bench)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

prepare() {
  mkdir -p "$WHL"
  local py="${PYTHON:-python3}"
  echo "[gpu] downloading cp312 manylinux wheels into $WHL" >&2
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "${WHEELS[@]}"
  if ! ls "$WHL"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
    # building the sdist imports torch (any build): GPU_BUILD_PYTHON, default the project's
    # .venv (setup.sh makes it); with DS_BUILD_OPS=0 the wheel is pure Python
    # (py3-none-any) and DeepSpeed JIT-builds the ops it needs at run time
    local bpy="${GPU_BUILD_PYTHON:-$ROOT/.venv/bin/python}"
    [ -x "$bpy" ] || bash "$ROOT/scripts/setup.sh"
    local src
    src="$(mktemp -d)"
    "$bpy" -m pip download -q --no-deps --no-binary=:all: -d "$src" "deepspeed==$DS_VERSION"
    echo "[gpu] building deepspeed $DS_VERSION (DS_BUILD_OPS=0)" >&2
    DS_BUILD_OPS=0 "$bpy" -m pip wheel -q --no-deps --no-build-isolation \
      -w "$WHL" "$src"/deepspeed-"$DS_VERSION".tar.gz
    rm -rf "$src"
  fi
  echo "[gpu] wheels in $WHL:" >&2
  ls -1 "$WHL" >&2
}

# ------------------------------------------------------------------ arguments
if [ "${1:-}" = "--prepare" ]; then
  [ $# -eq 1 ] || { echo "scripts/gpu.sh: --prepare takes no phases" >&2; exit 2; }
  prepare
  exit 0
fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=("${PHASES[@]}")
for p in "${phases[@]}"; do
  case "$p" in
    env|test|parity|bench) ;;
    *) echo "scripts/gpu.sh: unknown phase '$p' (allowed: ${PHASES[*]}, or --prepare)" >&2
       exit 2 ;;
  esac
done

DRY="${GPU_DRY_RUN:-0}"
OUT_DIR="${GPU_OUT:-$ROOT/reports/gpu}"
MODELS="${BENCH_MODELS:-llama-125m llama-350m llama-1b}"
STEPS="${BENCH_STEPS:-20}"
ZERO="${BENCH_ZERO:-2,3}"
PROFILE="${BENCH_PROFILE:-bench}"
for m in $MODELS; do
  [ -f "configs/$m.yaml" ] || { echo "scripts/gpu.sh: BENCH_MODELS: no configs/$m.yaml" >&2
                                exit 2; }
done
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [ "$DRY" != 1 ] && [ "${GPU_ALLOW_CPU:-0}" != 1 ] && ! has_gpu; then
  for p in "${phases[@]}"; do
    if [ "$p" = parity ] || [ "$p" = bench ]; then
      echo "scripts/gpu.sh: phase $p needs an NVIDIA GPU (nvidia-smi finds none); set" \
           "GPU_ALLOW_CPU=1 to run it anyway" >&2
      exit 2
    fi
  done
fi

# ------------------------------------------------------------------ set-up
PYTEST_PLUGIN=()
if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-python3}"
elif ls "$WHL"/*.whl >/dev/null 2>&1; then
  PY="${PYTHON:-python3}"
  SITE="${GPU_SITE:-/tmp/jaxlm-site}"
  wheels=("$WHL"/*.whl)
  stamp="$(printf '%s\n' "${wheels[@]##*/}" | sort | sha1sum | cut -c1-16)"
  if [ "$(cat "$SITE/.done" 2>/dev/null)" != "$stamp" ]; then
    echo "[gpu] installing ${#wheels[@]} wheels offline into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHL"/*.whl
    echo "$stamp" > "$SITE/.done"
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # the project is not pip-installed here, so its pytest plugin has no entry point
  PYTEST_PLUGIN=(-p parity.pytest_plugin)
else
  # shellcheck disable=SC1091
  . "$ROOT/scripts/setup.sh"
  PY=python
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

run() {  # run a command, or print it under GPU_DRY_RUN=1
  if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}
parity() { run "$PY" -c "import sys; from parity.cli import main; sys.argv[0] = 'parity'; main()" "$@"; }

phase_env() {
  if [ "$DRY" = 1 ]; then run "$PY" -m parity.gpu_env; return; fi
  "$PY" -m parity.gpu_env > "$OUT_DIR/env.json.tmp"
  mv "$OUT_DIR/env.json.tmp" "$OUT_DIR/env.json"
  cat "$OUT_DIR/env.json"
}

phase_test() {
  if [ "$DRY" = 1 ]; then run "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_PLUGIN[@]}" -m gpu tests; return; fi
  "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_PLUGIN[@]}" -m gpu tests 2>&1 \
    | tee "$OUT_DIR/pytest-gpu.log" || echo "[gpu] GPU tests failed (pytest-gpu.log)" >&2
}

phase_parity() {
  # one GPU: DeepSpeed at world size 1, JAX on the one device; fp32 (both trainers turn
  # TF32 off) and bf16; ZeRO 1-3; parity run always uses DeepSpeed's parity profile
  if [ "$DRY" = 1 ]; then parity run configs/tiny.yaml zero.world_size=1 --out "$OUT_DIR/parity-tiny"; return; fi
  rm -f "$OUT_DIR/parity-tiny/report.json"
  parity run configs/tiny.yaml zero.world_size=1 --out "$OUT_DIR/parity-tiny" 2>&1 \
    | tee "$OUT_DIR/parity-tiny.log" || echo "[gpu] parity run of tiny failed" >&2
}

phase_bench() {
  local m
  for m in $MODELS; do
    echo "[gpu] bench $m (bf16, seq 2048, ZeRO $ZERO, profile $PROFILE, $STEPS steps)" >&2
    local args=(bench "configs/$m.yaml" train.precision=bf16 data.seq_len=2048
                zero.world_size=1 --steps "$STEPS" --zero-stages "$ZERO"
                --ds-profile "$PROFILE" --json "$OUT_DIR/bench-$m.json")
    if [ "$DRY" = 1 ]; then parity "${args[@]}"; continue; fi
    rm -f "$OUT_DIR/bench-$m.json"
    parity "${args[@]}" 2>&1 | tee "$OUT_DIR/bench-$m.log" \
      || echo "[gpu] bench $m failed (bench-$m.log)" >&2
  done
}

for p in "${phases[@]}"; do
  echo "[gpu] phase $p ($(date -u +%H:%M:%S))" >&2
  "phase_$p"
done
run "$PY" -m parity.benchmarks_md "$OUT_DIR" docs/benchmarks.md

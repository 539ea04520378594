#!/usr/bin/env bash
# Set-up (if needed) and the default test suite (tests marked slow or gpu are left out;
# pass your own pytest arguments to change that, e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# the tests also cover the optional extras (hf: Hugging Face datasets sources; wandb:
# the W&B logger), installed once and recorded in .venv/.setup-done; `bash
# scripts/run.sh` installs none of them. JAXLM_EXTRAS= (empty) leaves them out.
export JAXLM_EXTRAS="${JAXLM_EXTRAS-hf,wandb}"
. scripts/setup.sh
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(-m "not slow and not gpu")
  ruff check .   # lint first: cheap, and a style slip should not wait for the slow part
fi
set +e
python -m pytest "${args[@]}"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc

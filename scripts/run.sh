#!/usr/bin/env bash
# Set-up (if needed) and the main job: a parity run of the tiny config on the embedded
# default data (the Python standard library sources); the last line names the report.
# Extra arguments go to `parity run`, e.g. `bash scripts/run.sh --precisions fp32`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup.sh
exec parity run configs/tiny.yaml --out reports/tiny "$@"

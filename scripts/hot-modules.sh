#!/usr/bin/env bash
# Rewrites scripts/hot-modules.txt: the site-packages folders a parity run imports from,
# which scripts/setup.sh byte-compiles (scripts/precompile.py). Run it after a change of
# requirements-lock.txt or of what the trainers import; about 4 minutes on 2 cores.
# It empties the .pyc caches of .venv's site-packages, runs a short parity run with
# bytecode writing on, lists the folders that got a .pyc, then compiles everything again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup.sh
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
env -u PYTHONDONTWRITEBYTECODE parity run configs/tiny.yaml --out "$tmp/report" \
  --steps-fp32 3 --steps-bf16 3 > "$tmp/run.log" 2>&1 || {
  tail -20 "$tmp/run.log" >&2
  echo "error: the parity run failed; scripts/hot-modules.txt is unchanged" >&2
  exit 1
}
{
  echo "# site-packages folders a parity run imports from (scripts/hot-modules.sh wrote"
  echo "# this list; scripts/precompile.py compiles their *.py files at set-up)"
  (cd "$site" && find . -name '*.pyc' -path '*/__pycache__/*' | sed 's|/__pycache__/.*||; s|^\./||' | sort -u)
} > "$tmp/hot-modules.txt"
mv "$tmp/hot-modules.txt" scripts/hot-modules.txt
python -m compileall -qq -j 0 "$site" >/dev/null 2>&1 || true
echo "scripts/hot-modules.txt: $(grep -vc '^#' scripts/hot-modules.txt) folders"

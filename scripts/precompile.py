"""Byte-compile the installed packages the main job imports, on every core.

Usage: ``python scripts/precompile.py SITE_PACKAGES [LIST]`` (LIST defaults to
``scripts/hot-modules.txt``: folders relative to SITE_PACKAGES, one per line, ``#``
comments). Each listed folder's ``*.py`` files are compiled (not its sub-folders); a
folder that does not exist is skipped. Without a list file every package is compiled.

Why: the machines this project runs on set ``PYTHONDONTWRITEBYTECODE``, so a module
without a ``.pyc`` is compiled again in every process that imports it (a parity run
starts ~20). Compiling all of site-packages costs ~30 s of a fresh set-up on 2 cores,
most of it for modules no run imports (transformers' 500 other models, pip, ...);
the list holds the ~650 folders a parity run imports from (``scripts/hot-modules.sh``
writes it), ~6,300 of ~15,000 files. A module missing from the list still works; it is
compiled in memory when imported, as without this script.
"""

from __future__ import annotations

import compileall
import os
import py_compile
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _compile(path: str) -> bool:
    try:
        py_compile.compile(path, doraise=True, quiet=2)
        return True
    except (py_compile.PyCompileError, OSError, SyntaxError, ValueError):
        return False  # as compileall: a file that does not compile is left alone


def listed_files(site: Path, list_file: Path) -> list[str]:
    files: list[str] = []
    for line in list_file.read_text().splitlines():
        rel = line.split("#", 1)[0].strip()
        folder = site / rel
        if rel and folder.is_dir():
            files += sorted(str(p) for p in folder.glob("*.py") if p.is_file())
    return files


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    site = Path(argv[0])
    list_file = Path(argv[1]) if len(argv) == 2 else Path(__file__).with_name(
        "hot-modules.txt")
    if not site.is_dir():
        print(f"error: {site} is not a folder", file=sys.stderr)
        return 2
    if not list_file.is_file():
        ok = compileall.compile_dir(str(site), quiet=2, workers=0)
        return 0 if ok else 1
    files = listed_files(site, list_file)
    workers = max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = sum(pool.map(_compile, files, chunksize=64))
    print(f"[setup] byte-compiled {done} of {len(files)} files in the folders of "
          f"{list_file.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

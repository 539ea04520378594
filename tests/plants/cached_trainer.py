"""``torchlm train`` with a cache of finished runs (test code for the plant catalogue).

``python cached_trainer.py CACHE_DIR train CONFIG [k=v ...] --init-weights F ...`` runs
the DeepSpeed trainer once per distinct (config file, initial weights, arguments other
than ``train.out_dir``) and afterwards copies that run's ``metrics.jsonl``,
``run_summary.json`` and ``dumps/`` into the requested ``train.out_dir``. Every plant of
the catalogue patches only the JAX side, so the reference is the same run each time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

KEEP = ("metrics.jsonl", "run_summary.json", "config.yaml", "dumps")


def cache_key(args: list[str]) -> str:
    h = hashlib.sha256()
    h.update(Path(args[1]).read_bytes())  # the config the harness wrote
    rest = [a for a in args[2:] if not a.startswith("train.out_dir=")]
    if "--init-weights" in rest:
        i = rest.index("--init-weights")
        h.update(Path(rest[i + 1]).read_bytes())
        del rest[i:i + 2]
    h.update("\0".join(rest).encode())
    return h.hexdigest()[:20]


def main() -> int:
    cache, args = Path(sys.argv[1]), sys.argv[2:]
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.out_dir=")))
    entry = cache / cache_key(args)
    if not (entry / "complete").is_file():
        code = ("import sys; from torchlm.cli import main; sys.argv[0] = 'torchlm'; "
                "sys.exit(main())")
        rc = subprocess.call([sys.executable, "-c", code, *args])
        if rc != 0:
            return rc
        tmp = cache / f".{entry.name}.{os.getpid()}"
        tmp.mkdir(parents=True)
        for name in KEEP:
            src = out / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        (tmp / "complete").write_text("ok\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        print(f"[cached_trainer] stored {entry}", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        src = entry / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, out / name)
    print(f"[cached_trainer] reused {entry}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

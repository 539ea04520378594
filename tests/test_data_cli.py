"""``parity data``: builds or reuses the token cache, same fingerprint every time,
clean errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lmspec.config import load_config
from lmspec.data import Dataset, fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def parity(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from parity.cli import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def field(out: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", out, re.M)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1).strip()


def test_parity_data_tiny_twice_same_fingerprint(tmp_path):
    """The default tiny config (whole stdlib, byte tokenizer) into a private cache."""
    cache = tmp_path / "cache"
    args = ("data", str(TINY), f"data.cache_dir={cache}", "--steps", "2")
    first = parity(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = parity(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    for name in ("step 0 fingerprint", "step 1 fingerprint", "cache", "tokens",
                 "windows per epoch"):
        assert field(first.stdout, name) == field(second.stdout, name)
    fp0 = field(first.stdout, "step 0 fingerprint")
    assert re.fullmatch(r"[0-9a-f]{16}", fp0)
    assert fp0 != field(first.stdout, "step 1 fingerprint")
    assert field(first.stdout, "vocabulary").startswith("259 ")
    # the printed figures are those of the library
    ds = Dataset.from_config(load_config(TINY, [f"data.cache_dir={cache}"]))
    assert fingerprint(ds.global_batch(0)) == fp0
    assert field(first.stdout, "tokens").startswith(f"{ds.num_tokens} ")
    assert field(first.stdout, "windows per epoch").startswith(
        f"train {ds.num_train_windows}, val {ds.num_val_windows}")
    assert Path(field(first.stdout, "cache")).resolve() == ds.path.resolve()


def test_parity_data_unknown_key_exits_2_without_traceback(tmp_path):
    proc = parity("data", str(TINY), "no.such_key=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no.such_key" in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_parity_data_missing_source_exits_2(tmp_path):
    proc = parity("data", str(TINY), f"data.source={tmp_path / 'missing.txt'}",
                  f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.source" in proc.stderr and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr

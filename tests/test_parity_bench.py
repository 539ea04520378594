"""``parity bench`` with the contract-keeping stand-in trainer, and CLI error handling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lmspec.config import load_config
from parity.bench_cmd import format_bench, run_bench
from parity.cli import main

ROOT = Path(__file__).resolve().parents[1]


def fake_cmd(side: str) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("fake_trainer.py")), side]


def test_bench_ratio_is_last_line(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc def ghi\n" * 2000)
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                       "data.seq_len=32"])
    res = run_bench(cfg, 5, tmp_path / "b", trainer_cmd=fake_cmd)
    # the stand-in reports 1000 (jax) and 800 (torch) tokens/s per device
    assert res["ratio"] == pytest.approx(1000 / 800)
    lines = format_bench(res)
    assert lines[-1] == "JAX/DeepSpeed tokens/s per device ratio: 1.250"
    assert lines[1].split()[0] == "JAX" and lines[2].split()[0] == "DeepSpeed"
    assert "300 MiB" in lines[1]
    with pytest.raises(ValueError, match="warmup_steps_excluded"):
        run_bench(cfg, 2, tmp_path / "b2", trainer_cmd=fake_cmd)


@pytest.mark.parametrize("argv,msg", [
    (["run", "configs/tiny.yaml", "--out", "x", "--zero-stages", "1,5"], "zero-stages"),
    (["run", "configs/tiny.yaml", "--out", "x", "--precisions", "fp16"], "precisions"),
    (["run", "configs/tiny.yaml", "--out", "x", "train.nope=1"], "train.nope"),
    (["bench", "configs/tiny.yaml", "--steps", "1"], "warmup_steps_excluded"),
])
def test_cli_errors_exit_2(argv, msg, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err

"""``parity run`` always runs DeepSpeed under the bitwise-strict ``parity`` profile."""

from __future__ import annotations

import sys
from pathlib import Path

from lmspec.config import load_config
from parity import run as P

ROOT = Path(__file__).resolve().parents[1]


def fake_cmd(side: str) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("fake_trainer.py")), side]


def test_parity_run_forces_the_parity_profile(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"data.source=text:{text}", f"data.cache_dir={tmp_path / 'cache'}",
                       "data.seq_len=32", "zero.profile=bench"])
    opts = P.ParityOptions(out=tmp_path / "out", forward=False, trainer_cmd=fake_cmd,
                           zero_stages=(1,), precisions=("fp32",), steps_fp32=3,
                           run_timeout_s=120)
    P.run_parity(cfg, opts)
    assert ("zero.profile=bench ignored: parity run always uses DeepSpeed's parity profile"
            in capsys.readouterr().out)
    for saved in (tmp_path / "out" / "config.yaml",
                  tmp_path / "out" / "runs" / "ds_zero1_fp32" / "config.yaml"):
        assert load_config(saved).zero.profile == "parity"

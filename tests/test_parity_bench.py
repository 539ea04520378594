"""``parity bench`` with the contract-keeping stand-in trainer, and CLI error handling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmspec.config import load_config
from parity.bench_cmd import format_bench, run_bench
from parity.cli import main

ROOT = Path(__file__).resolve().parents[1]


def fake_cmd(side: str) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("fake_trainer.py")), side]


@pytest.fixture()
def cfg(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc def ghi\n" * 2000)
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                        "data.seq_len=32"])


def test_bench_ratio_is_last_line(cfg, tmp_path):
    res = run_bench(cfg, 5, tmp_path / "b", trainer_cmd=fake_cmd)
    # the stand-in reports 1000 (jax) and 800 (torch, ZeRO-1: tiny's zero.stage) tokens/s
    assert res["ratio"] == pytest.approx(1000 / 800) and res["zero_stages"] == [1]
    assert res["ds_profile"] == "bench" and res["torch"]["1"]["zero_profile"] == "bench"
    lines = format_bench(res)
    assert lines[-1] == "JAX/DeepSpeed tokens/s per device ratio: 1.250"
    assert lines[1].split()[0] == "JAX"
    assert lines[2].startswith("DeepSpeed ZeRO-1 (bench)")
    assert "300 MiB" in lines[1]
    assert "DeepSpeed profile: bench (fused AdamW, overlap_comm" in "\n".join(lines)
    with pytest.raises(ValueError, match="warmup_steps_excluded"):
        run_bench(cfg, 2, tmp_path / "b2", trainer_cmd=fake_cmd)


def test_bench_stages_profile_and_json(cfg, tmp_path, monkeypatch, capsys):
    """One JAX run, one DeepSpeed run per stage, the parity profile on request; the
    stand-in reports ZeRO-2 700 and ZeRO-3 600 tokens/s, JAX 1000."""
    import parity.bench_cmd as B

    real = B.run_bench
    monkeypatch.setattr(B, "run_bench", lambda *a, **k: real(*a, **k, trainer_cmd=fake_cmd))
    out = tmp_path / "res" / "bench.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", str(ROOT / "configs/tiny.yaml"), *cfg_overrides(cfg), "--steps", "5",
              "--zero-stages", "3,2", "--ds-profile", "parity", "--json", str(out),
              "--out", str(tmp_path / "runs")])
    assert e.value.code == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines()
             if not ln.startswith("[parity]")]  # progress lines first
    res = json.loads(out.read_text())
    assert sorted(res["torch"]) == ["2", "3"] and res["zero_stages"] == [3, 2]
    assert {s["zero_profile"] for s in res["torch"].values()} == {"parity"}
    assert res["ratios"] == pytest.approx({"3": 1000 / 600, "2": 1000 / 700})
    assert (res["ratio_stage"], res["ratio"]) == (2, pytest.approx(1000 / 700))
    table = [ln.split("  ")[0] for ln in lines[1:4]]
    assert table == ["JAX", "DeepSpeed ZeRO-3 (parity)", "DeepSpeed ZeRO-2 (parity)"]
    assert "ZeRO-3: JAX/DeepSpeed tokens/s per device 1.667" in lines
    assert "ZeRO-2: JAX/DeepSpeed tokens/s per device 1.429" in lines
    assert lines[-1] == "JAX/DeepSpeed tokens/s per device ratio: 1.429"
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left over
    # each run really is a separate DeepSpeed run with the profile passed down
    for stage in (2, 3):
        saved = load_config(tmp_path / "runs" / f"torch_zero{stage}" / "config.yaml")
        assert (saved.zero.stage, saved.zero.profile) == (stage, "parity")


def cfg_overrides(cfg) -> list[str]:
    return [f"data.source={cfg.data.source}", f"data.cache_dir={cfg.data.cache_dir}",
            "data.seq_len=32"]


@pytest.mark.parametrize("argv,msg", [
    (["run", "configs/tiny.yaml", "--out", "x", "--zero-stages", "1,5"], "zero-stages"),
    (["run", "configs/tiny.yaml", "--out", "x", "--precisions", "fp16"], "precisions"),
    (["run", "configs/tiny.yaml", "--out", "x", "train.nope=1"], "train.nope"),
    (["bench", "configs/tiny.yaml", "--steps", "1"], "warmup_steps_excluded"),
    (["bench", "configs/tiny.yaml", "--zero-stages", "2,2"], "repeats a stage"),
    (["bench", "configs/tiny.yaml", "--zero-stages", "4"], "not a ZeRO stage"),
    (["bench", "configs/tiny.yaml", "--ds-profile", "fast"], "--ds-profile"),
])
def test_cli_errors_exit_2(argv, msg, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_world_size_above_gpu_count_is_refused():
    from parity.bench_cmd import _check

    cfg = load_config(ROOT / "configs/tiny.yaml")  # zero.world_size 2
    with pytest.raises(ValueError, match=r"zero.world_size=2 but this machine has 1 GPU"):
        _check(cfg, 5, None, (1,), "bench", num_gpus=1)
    _check(load_config(ROOT / "configs/tiny.yaml", ["zero.world_size=1"]), 5, None, (1,),
           "bench", num_gpus=1)  # one GPU, world size 1: fine

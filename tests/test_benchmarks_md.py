"""parity.benchmarks_md: the generated block of docs/benchmarks.md, on synthetic results."""

from __future__ import annotations

import json

import pytest

from parity.benchmarks_md import BEGIN, END, NOT_RUN, main, update_markdown


def summary(side: str, tps: float, **kw) -> dict:
    s = {"side": side, "tokens_per_s": tps, "mfu": tps / 4e5, "step_time_s": 16384 / tps,
         "peak_memory_bytes": 3000 << 20, "num_devices": 1, "device_kind": "NVIDIA H100"}
    s["compile_s" if side == "jax" else "startup_s"] = 12.5
    s.update(kw)
    return s


def write_results(d):
    d.mkdir()
    (d / "env.json").write_text(json.dumps({
        "date": "2026-11-22T20:00:00Z", "python": "3.12.3", "platform": "Linux-x86_64",
        "cpu": "AMD EPYC 9454", "cpu_count": 16, "memory_gib": 125.8,
        "packages": {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2",
                     "torch": "2.11.0+cu130", "deepspeed": "0.19.8"},
        "torch_cuda": "13.0",
        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "driver": "580.65.06",
                  "memory_mib": 81559}]}))
    (d / "pytest-gpu.log").write_text("....\n3 passed, 420 deselected in 61.2s\n")
    (d / "parity-tiny").mkdir()
    (d / "parity-tiny" / "report.json").write_text(json.dumps({"checks": [
        {"name": "fp32 zero1: loss rel diff", "value": 2e-8, "limit": 1e-5, "op": "<=",
         "passed": True},
        {"name": "bf16 zero2: gap/floor over 50 steps", "value": 1.37, "limit": 1.0,
         "op": "<=", "passed": False}], "errors": []}))
    (d / "bench-llama-125m.json").write_text(json.dumps({
        "config": "llama-125m", "precision": "bf16", "seq_len": 2048,
        "global_batch_size": 8, "micro_batch_size": 1, "world_size": 1, "steps": 30,
        "ds_profile": "bench", "zero_stages": [2, 3],
        "jax": summary("jax", 165400.0),
        "torch": {"2": summary("torch", 52000.0, zero_profile="bench"),
                  "3": summary("torch", 40000.0, zero_profile="bench")},
        "ratios": {"2": 165400 / 52000, "3": 165400 / 40000}, "ratio": 165400 / 52000}))
    (d / "bench-llama-1b.log").write_text("Traceback ...\n")  # a bench that failed


def test_block_from_synthetic_results(tmp_path):
    res = tmp_path / "gpu"
    write_results(res)
    md = tmp_path / "docs" / "benchmarks.md"
    update_markdown(res, md)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n")  # the hand-written intro of a new file
    block = text[text.index(BEGIN):text.index(END)]
    assert "1 x NVIDIA H100 80GB HBM3 (81,559 MiB), driver 580.65.06" in block
    assert "jax 0.11.2, jaxlib 0.11.2, jax-cuda13-plugin 0.11.2" in block
    assert "torch CUDA 13.0" in block
    assert "`3 passed, 420 deselected in 61.2s`" in block
    assert "FAIL: 1/2 checks passed." in block
    assert "- failed: bf16 zero2: gap/floor over 50 steps: 1.37 (limit <= 1)" in block
    rows = [ln for ln in block.splitlines() if ln.startswith("| llama-125m")]
    assert rows == [
        "| llama-125m | 1 | 2 | bench | 165,400 | 52,000 | 3.18 | 0.413 | 0.13 | 0.0991 | 0.315 "
        "| 3,000 | 3,000 | 12.5 | 12.5 |",
        "| llama-125m | 1 | 3 | bench | 165,400 | 40,000 | 4.13 | 0.413 | 0.1 | 0.0991 | 0.41 "
        "| 3,000 | 3,000 | 12.5 | 12.5 |"]
    assert "- llama-1b: failed (see bench-llama-1b.log)" in block
    assert "- llama-125m: bf16, seq_len 2048, global batch 8 (micro 1)" in block


def test_rerun_keeps_the_text_outside_the_markers(tmp_path):
    res = tmp_path / "gpu"
    res.mkdir()  # nothing was run
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# Mine\n\nhand text\n\n{BEGIN}\nold figures\n{END}\n\n## After\nkept\n")
    assert main([str(res), str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Mine\n\nhand text\n\n" + BEGIN)
    assert text.endswith(f"{END}\n\n## After\nkept\n")
    assert "old figures" not in text
    block = text[text.index(BEGIN):text.index(END)]
    assert block.count(NOT_RUN) == 4  # machine, tests, parity, throughput
    update_markdown(res, md)
    assert md.read_text() == text  # idempotent
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_results_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "absent"), str(tmp_path / "b.md")]) == 2
    assert "results folder not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        update_markdown(tmp_path / "absent", tmp_path / "b.md")

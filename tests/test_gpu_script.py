"""scripts/gpu.sh on CPU: syntax, lint, the phase parser and the commands of each phase
(GPU_DRY_RUN=1 prints them instead of running them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu.sh"


def gpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("args,env,msg", [
    (["bogus"], {}, "unknown phase 'bogus' (allowed: env test parity bench, or --prepare)"),
    (["--prepare", "env"], {}, "--prepare takes no phases"),
    (["bench"], {"BENCH_MODELS": "llama-9b"}, "BENCH_MODELS: no configs/llama-9b.yaml"),
])
def test_bad_arguments_exit_2_before_any_work(args, env, msg, tmp_path):
    proc = gpu_sh(*args, GPU_OUT=str(tmp_path / "out"), **env)
    assert proc.returncode == 2 and msg in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was set up or run


def commands(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("+ ")]


def test_default_phases_in_order(tmp_path):
    out = tmp_path / "gpu"
    cmds = commands(gpu_sh(GPU_DRY_RUN="1", GPU_OUT=str(out)))
    assert cmds[0].endswith("-m parity.gpu_env")
    assert "-m pytest" in cmds[1] and cmds[1].endswith("-m gpu tests")
    assert f"run configs/tiny.yaml zero.world_size=1 --out {out}/parity-tiny" in cmds[2]
    benches = [c for c in cmds if " bench configs/" in c]
    assert [c.split(" bench configs/")[1].split(".yaml")[0] for c in benches] == [
        "llama-125m", "llama-350m", "llama-1b"]
    assert cmds[-1].endswith(f"-m parity.benchmarks_md {out} docs/benchmarks.md")


def test_one_bench_model_as_its_own_call(tmp_path):
    out = tmp_path / "gpu"
    cmds = commands(gpu_sh("bench", GPU_DRY_RUN="1", GPU_OUT=str(out),
                           BENCH_MODELS="llama-1b", BENCH_ZERO="3", BENCH_STEPS="12"))
    assert len(cmds) == 2
    assert cmds[0].endswith(
        "bench configs/llama-1b.yaml train.precision=bf16 data.seq_len=2048 "
        f"zero.world_size=1 --steps 12 --zero-stages 3 --ds-profile bench "
        f"--json {out}/bench-llama-1b.json")
    assert "parity.benchmarks_md" in cmds[1]


@pytest.mark.parametrize("phases", [["bench"], ["env", "parity"]])
def test_gpu_phases_refuse_to_run_without_a_gpu(phases, tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = gpu_sh(*phases, GPU_OUT=str(tmp_path / "gpu"))
    assert proc.returncode == 2
    assert f"phase {phases[-1]} needs an NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "gpu").exists()  # refused before any set-up

"""parity.gpu_env: the environment record of a benchmark (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_env(path_dirs: list[Path]) -> dict:
    env = {**os.environ, "PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])}
    out = subprocess.run([sys.executable, "-m", "parity.gpu_env"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)  # exactly one JSON object


def test_cpu_machine_lists_no_gpu(tmp_path):
    rec = run_env([tmp_path])  # no nvidia-smi on PATH
    assert rec["gpus"] == []
    assert rec["date"].endswith("Z") and rec["cpu_count"] >= 1 and rec["memory_gib"] > 0
    assert rec["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"torch", "numpy", "jax", "deepspeed"} <= set(rec["packages"])
    assert "torch_cuda" in rec


def test_gpus_from_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.65.06, 81559'\n"
                   "echo 'NVIDIA H100 80GB HBM3, 580.65.06, 81559'\n")
    smi.chmod(0o755)
    rec = run_env([tmp_path])
    assert rec["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "driver": "580.65.06",
                            "memory_mib": 81559}] * 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert run_env([tmp_path])["gpus"] == []  # a broken driver is no crash

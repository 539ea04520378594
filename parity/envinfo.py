"""The environment record of a report: library versions and hardware."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "deepspeed",
                    "transformers", "numpy", "safetensors")


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of :data:`VERSION_PACKAGES` and ``extra`` (from package
    metadata, nothing imported); packages that are not installed are left out."""
    from lmspec.runs import versions as installed

    return {k: v for k, v in installed(*VERSION_PACKAGES, *extra).items()
            if v != "not installed"}


def hardware() -> dict[str, Any]:
    """CPU model, logical cores, memory, GPUs (by nvidia-smi when present)."""
    hw: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                          "cpu_count": os.cpu_count()}
    try:
        hw["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        hw["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            r = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                hw["gpus"] = "; ".join(r.stdout.strip().splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return hw

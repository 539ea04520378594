"""``python -m parity.gpu_env``: the machine a benchmark ran on, as one JSON object.

Date (UTC), Python, platform, CPU model and count, memory, the versions of the packages
the figures depend on (JAX and its CUDA plugin, Flax, optax, Orbax, torch and the CUDA
it was built for, DeepSpeed, transformers, numpy) and the GPUs that ``nvidia-smi``
lists (name, driver, memory; ``[]`` where there is none). Nothing here needs a GPU.
``scripts/gpu.sh`` writes it to ``GPU_OUT/env.json`` for ``parity.benchmarks_md``.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys
from typing import Any

from parity.run import hardware, versions

# beyond parity.run.versions(): the accelerator plugins and what gpu.sh installs
EXTRA_PACKAGES = ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                  "jax-cuda12-pjrt", "hjson", "pydantic", "tensorboardX")


def gpus() -> list[dict[str, Any]]:
    """One entry per GPU that ``nvidia-smi`` lists: name, driver, memory in MiB;
    ``[]`` without nvidia-smi or when it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if r.returncode != 0:
        return []
    out = []
    for line in r.stdout.strip().splitlines():
        name, driver, mem = (x.strip() for x in (line.split(",") + ["", ""])[:3])
        out.append({"name": name, "driver": driver,
                    "memory_mib": int(mem) if mem.isdigit() else None})
    return out


def torch_cuda() -> str | None:
    """``torch.version.cuda`` (None for a CPU build or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def package_versions() -> dict[str, str]:
    """:func:`parity.run.versions` plus the accelerator plugins (only those installed)."""
    return versions(*EXTRA_PACKAGES)


def environment() -> dict[str, Any]:
    """The whole record (see the module docstring)."""
    hw = hardware()
    hw.pop("gpus", None)  # listed in full below
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **hw,
        "packages": package_versions(),
        "torch_cuda": torch_cuda(),
        "gpus": gpus(),
    }


def main() -> int:
    json.dump(environment(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

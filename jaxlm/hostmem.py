"""Host memory of the CPU backend, where device buffers are ordinary heap memory.

glibc's malloc keeps freed memory for reuse unless told otherwise: blocks under its
(growing) mmap threshold come from the heap and stay there after ``free``, so the
corpus read to hash the data source, the host copy of ``--init-weights`` and XLA's
compile-time memory all stayed in the process's resident set while it trained
(``configs/small.yaml`` bf16 on 2 virtual devices: peak 1993 MiB; docs/jaxlm.md has the
breakdown). With a fixed 128 KiB mmap threshold large blocks go back to the system when
freed, and :func:`release_free_memory` hands the heap's free pages back after set-up and
compilation. Nothing changes off Linux/glibc (the calls are skipped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's initial mmap threshold, here kept fixed


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure_host_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds at 128 KiB; True if it applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
    return bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1 and ok)


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

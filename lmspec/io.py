"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

A crash or SIGKILL at any point leaves either the old file or the new one, never a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmspec.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``. The file gets the
    mode a plain ``open()`` would give it (0666 less the umask: 0644 by default), not the
    temporary file's private 0600, so reports and weights stay readable by others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path``; a UserError naming it when it is missing, unreadable
    or not JSON."""
    from lmspec.errors import UserError, UserFileNotFoundError

    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not a readable {what} ({e})") from None


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask
    sets it while reading, which another thread could see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block.

    Serialises cache builds between processes on one machine (e.g. the two sides of a
    parity run starting together); released automatically if the process dies.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` (and its parents) if missing and prove it writable with
    a probe file that is removed at once; a :class:`UserError` naming ``what`` (the key or
    flag, e.g. ``train.out_dir``) otherwise. Called before any work, so a run that cannot
    write its results fails in a second, not after training. Nothing already in the
    folder is touched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}={path} is a file, not a folder; choose another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}={path}: cannot create the folder ({e.strerror or e}); "
                        f"choose another {what}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    except OSError as e:
        raise UserError(f"{what}={path} is not writable ({e.strerror or e}); choose another "
                        f"{what} or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Before any work: a :class:`UserError` naming ``what`` (a flag such as ``--json``)
    when ``path`` cannot become a file: it is a folder, a file stands where a folder of
    it should be, or its nearest existing folder is not writable. Creates nothing (a
    probe file is removed at once)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
    except OSError as e:
        raise UserError(f"{what} {path}: {parent} is not writable ({e.strerror or e})"
                        ) from None
    os.close(fd)
    os.unlink(probe)
    return path

"""Ending a multi-process job when one of its processes dies.

A training job is several processes that wait for each other: ``torchlm train`` (the
launcher) -> torchrun (the agent) -> the DeepSpeed workers, or the ``jaxlm train``
processes of a ``jax.distributed`` job. When one of them dies, the others must not train
on or hang; each process that can notice ends itself within seconds, with one line
naming the process that died, and exit status :data:`EXIT_PEER_LOST`:

- a torchrun worker watches its agent (its parent) and the ``torchlm`` launcher
  (:func:`watch_parents`);
- a ``jaxlm`` process of a multi-process job writes a heartbeat to the JAX coordination
  service's key-value store every second and watches everyone else's
  (``jaxlm.distributed``); a collective that fails because a peer vanished asks the
  same heartbeats who it was.

A watchdog leaves with ``os._exit``: the interpreter's teardown would wait on the dead
process (``jax.distributed``'s shutdown barrier, gloo's pending collectives).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_PEER_LOST = 4
# how often a watchdog looks (seconds)
POLL_S = 0.5


def die(message: str, code: int = EXIT_PEER_LOST) -> None:
    """Print ``error: <message>`` and leave now, without interpreter teardown."""
    try:
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def pid_alive(pid: int) -> bool:
    """The process ``pid`` exists (and is not a zombie we could see)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a dead child not yet reaped by its parent is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Watchdog(threading.Thread):
    """A daemon thread calling each check every ``interval`` seconds; the first one to
    return a message ends the process with it (:func:`die`)."""

    def __init__(self, checks: list[Callable[[], str | None]], interval: float = POLL_S,
                 name: str = "watchdog") -> None:
        super().__init__(name=name, daemon=True)
        self.checks, self.interval = checks, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for check in self.checks:
                msg = check()
                if msg is not None and not self.stopped.is_set():
                    die(msg)

    def stop(self) -> None:
        self.stopped.set()


def watch_parents(who: str, launcher_pid: int | None) -> Watchdog:
    """Start a watchdog for a launched worker: ends it when the ``torchlm`` launcher
    (``launcher_pid``, when known) or its own parent (the agent) is gone. ``who`` names
    this process in the message."""
    parent = os.getppid()
    checks: list[Callable[[], str | None]] = []
    if launcher_pid is not None and launcher_pid != parent:
        def launcher_gone() -> str | None:
            if pid_alive(launcher_pid):
                return None
            return (f"the torchlm launcher (pid {launcher_pid}) died; {who} stops "
                    "(its checkpoints up to the last complete one are kept)")
        checks.append(launcher_gone)

    def parent_gone() -> str | None:
        if os.getppid() == parent and pid_alive(parent):
            return None
        return (f"its launcher process (pid {parent}, the torchrun agent) died; {who} stops "
                "(its checkpoints up to the last complete one are kept)")
    checks.append(parent_gone)
    dog = Watchdog(checks, name="parent-watchdog")
    dog.start()
    return dog


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until every pid has exited, at most ``timeout_s``; the ones still alive."""
    end = time.monotonic() + timeout_s
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.1)
        alive = [p for p in alive if pid_alive(p)]
    return alive

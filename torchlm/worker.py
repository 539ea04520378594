"""``python -m torchlm.worker CONFIG [k=v ...]``: one training process.

Run it under a launcher (``torchrun --nproc_per_node N -m torchlm.worker ...`` or
``deepspeed --module torchlm.worker ...``), or alone for world size 1. ``torchlm train``
does the launching for you.
"""

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import record

from lmspec.cli import run
from torchlm.trainer import main


def watch_launchers() -> None:
    """Under torchrun: record this worker's pid for ``torchlm train`` and end the worker
    when torchrun or ``torchlm train`` dies (:mod:`lmspec.watchdog`)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return  # started alone (world size 1): nothing to watch
    from lmspec.watchdog import watch_parents
    from torchlm.launch import LAUNCHER_PID_ENV, PID_DIR_ENV

    rank = os.environ.get("RANK", "?")
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        try:
            with open(os.path.join(pid_dir, f"rank-{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass
        _mark_termination(os.path.join(pid_dir, f"rank-{rank}.terminated"))
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    watch_parents(f"torchlm worker rank {rank} (pid {os.getpid()})",
                  int(launcher) if launcher.isdigit() else None)


def _mark_termination(marker: str) -> None:
    """On SIGTERM (torchrun ending the other workers once one has failed) write ``marker``,
    then die of the signal as before: the launcher then tells a rank torchrun terminated
    from one that died on its own (:func:`torchlm.launch.silent_deaths`)."""

    def on_term(signum: int, frame: object) -> None:
        try:
            with open(marker, "w"):
                pass
        except OSError:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)


def serve(main: Callable[[Sequence[str] | None], int]) -> NoReturn:
    """Run ``main`` as one torchrun rank and leave: the launcher watch, then ``main`` under
    torchrun's ``@record`` (a bug propagates to it, which writes it where torchrun's
    launcher finds it), then exit without interpreter teardown. On CPU a native background
    thread (gloo / DeepSpeed) still joinable at static destruction sometimes aborts a
    finished worker ("terminate called without an active exception", seen once in ~50
    launches here), which would turn a complete run into a failure. Every output is
    written atomically and the process group is destroyed by now; only the streams need
    flushing."""

    @record
    def entry() -> int:
        watch_launchers()
        return run(main, raise_bugs=True)

    rc = entry()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    serve(main)

"""Start ``zero.world_size`` worker processes through torchrun and report their failure.

torchrun (``python -m torch.distributed.run --standalone``: local rendezvous on a free
port) starts the workers and, when one exits with an error, stops the others and exits
non-zero. Each worker records its exception (``torch.distributed.elastic``'s ``@record``
error files, one per rank, in a temporary folder); the earliest one is the root cause
and is what this module reports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lmspec.config import ExperimentConfig
from lmspec.nonfinite import STOP_FILE, NonFiniteError
from torchlm.runfolder import LAUNCH_TIME_ENV


class WorkerError(RuntimeError):
    """A training worker died; the message names its rank and its exception."""


class AgentDied(RuntimeError):
    """The torchrun agent was killed; its workers stopped with it (they watch it)."""


# set in the workers' environment: who launched them, and where they leave their pids
LAUNCHER_PID_ENV = "TORCHLM_LAUNCHER_PID"
PID_DIR_ENV = "TORCHLM_PID_DIR"


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """In the torchrun child before exec: SIGKILL it when this launcher dies (Linux)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def worker_pids(pid_dir: str | os.PathLike) -> list[int]:
    """The pids the workers of this launch recorded (``rank-R.pid``)."""
    pids = []
    for f in Path(pid_dir).glob("rank-*.pid"):
        try:
            pids.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            pass
    return pids


def torchrun_command(num_procs: int, worker_args: Sequence[str], log_dir: str,
                     module: str = "torchlm.worker") -> list[str]:
    """The torchrun command line that runs ``module`` (the training worker by default;
    ``torchlm.state_worker`` for ``parity convert``) on ``num_procs`` ranks; torchrun
    keeps the workers' error files under ``log_dir``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(num_procs),
        "--monitor_interval", "0.2", "--log_dir", log_dir,
        "-m", module, *worker_args,
    ]


def gpu_expected() -> bool:
    """Whether the workers will find a CUDA GPU, asked without importing torch (~1.5 CPU-s
    of every launch): torch is not a CPU build, CUDA_VISIBLE_DEVICES does not hide every
    device, and ``nvidia-smi -L`` lists one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if "+cpu" in version("torch"):
            return False
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCH_TIME_ENV] = repr(time.time())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not gpu_expected():
        env.setdefault("DS_ACCELERATOR", "cpu")
        threads = max(1, (os.cpu_count() or 1) // cfg.zero.world_size)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def root_cause(error_dir: str | os.PathLike) -> str | None:
    """``"rank R: <exception message>"`` of the earliest recorded worker error (a peer
    that fails later, e.g. on the dead rank's closed connection, is a consequence)."""
    best = None
    for path in Path(error_dir).rglob("error.json"):
        try:
            data = json.loads(path.read_text())
            msg = data["message"]
            if isinstance(msg, str):
                msg = json.loads(msg)
            text = msg["message"]
            ts = path.stat().st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rank = _rank_of(path)
        if best is None or ts < best[0]:
            best = (ts, rank, text)
    if best is None:
        return None
    _, rank, text = best
    return f"rank {rank}: {text}" if rank is not None else text


def _rank_of(path: Path) -> int | None:
    # torchrun writes <dir>/.../attempt_0/<local_rank>/error.json
    for part in reversed(path.parts[:-1]):
        if part.isdigit():
            return int(part)
    return None


def _non_finite_stop(cfg: ExperimentConfig, launch_time: str) -> str | None:
    """The message rank 0 left in ``stopped.json`` if this launch's workers stopped on a
    non-finite step (the file of an earlier launch has another ``launch_time``)."""
    try:
        data = json.loads((Path(cfg.train.out_dir) / STOP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("launch_time") != launch_time:
        return None
    return str(data.get("message"))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def launch(cfg: ExperimentConfig, worker_args: Sequence[str],
           module: str = "torchlm.worker", *, die_with_parent: bool = True) -> int:
    """Run ``zero.world_size`` workers of ``module`` (:func:`torchrun_command`) to
    completion; raise :class:`WorkerError` if one failed,
    :class:`AgentDied` if torchrun itself was killed, or
    :class:`~lmspec.nonfinite.NonFiniteError` if they stopped on a non-finite step.

    Dead processes end the whole job: torchrun is SIGKILLed when this launcher dies
    (parent-death signal), and each worker watches this launcher and torchrun
    (:func:`lmspec.watchdog.watch_parents`), so no process trains on alone.
    ``die_with_parent=False`` leaves the parent-death signal out: it is set by Python
    code run between fork and exec, which can deadlock in a launcher that runs other
    threads (JAX's, in ``parity convert``); the workers still end with the launcher."""
    from lmspec.watchdog import wait_gone

    with tempfile.TemporaryDirectory(prefix="torchlm-run-") as log_dir:
        cmd = torchrun_command(cfg.zero.world_size, worker_args, log_dir, module)
        env = _worker_env(cfg)
        env[LAUNCHER_PID_ENV] = str(os.getpid())
        env[PID_DIR_ENV] = log_dir
        proc = subprocess.Popen(cmd, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux"
                                and die_with_parent else None)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            rc = proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM: torchrun forwards SIGTERM to its workers and reaps them
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc < 0:  # torchrun itself was killed: its workers notice within a second
            left = wait_gone(worker_pids(log_dir), 20.0)
            for pid in left:  # pragma: no cover - a worker that did not watch
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise AgentDied(
                f"the torchrun agent (pid {proc.pid}) was killed by "
                f"{signal.Signals(-rc).name}; its workers stopped with it"
                + (f" (killed {len(left)} that had not)" if left else "")
                + "; resume from the last complete checkpoint with the same command")
        stop = _non_finite_stop(cfg, env[LAUNCH_TIME_ENV])
        if stop is not None:
            raise NonFiniteError(stop)
        if rc == 0:
            return 0
        cause = root_cause(log_dir)
        silent = silent_deaths(log_dir)
        raise WorkerError(
            f"training worker failed (torchrun exit status {rc})"
            + (f"; {silent} (the others then lost their connection to it)" if silent else "")
            + (f"; first error on {cause}" if cause else "; see the worker output above")
        )


def silent_deaths(log_dir: str | os.PathLike) -> str | None:
    """The workers that recorded a pid but no Python error: killed by a signal or a
    native crash (``"rank 1 (pid 123) died without a Python error (killed by a signal
    or a native crash)"``), the usual root cause when the others report a closed
    connection; None when every worker that died left an error report."""
    errors = {_rank_of(p) for p in Path(log_dir).rglob("error.json")}
    # ranks torchrun terminated (SIGTERM) after another failed: explained, not silent
    ended = {int(r) for f in Path(log_dir).glob("rank-*.terminated")
             if (r := f.stem.removeprefix("rank-")).isdigit()}
    dead = []
    for f in sorted(Path(log_dir).glob("rank-*.pid")):
        rank = f.stem.removeprefix("rank-")
        if not rank.isdigit() or int(rank) in errors or int(rank) in ended:
            continue
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        dead.append(f"rank {rank} (pid {pid})")
    if not dead or not (errors or ended):  # nothing to set them apart from
        return None
    return (", ".join(dead) + " died"
            " without a Python error (killed by a signal or a native crash)")

"""A process of a training job dies: the whole job ends within 30 s, nothing is left
running, and a line names the process that died (lmspec.watchdog, jaxlm.distributed's
heartbeats, torchlm.launch). The fast tests drive the pieces; the slow ones kill real
`torchlm train` / 2-process `jaxlm train` jobs with SIGKILL (and SIGSTOP, a hang)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmspec.watchdog import EXIT_PEER_LOST, pid_alive, wait_gone

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LIMIT_S = 30.0  # the whole job ends within this after a death


# ----------------------------------------------------------------------------- fast


def test_a_worker_ends_when_its_parent_dies(tmp_path):
    """watch_parents: a child whose parent is SIGKILLed leaves within a second, exit
    status 4, with a line naming the parent."""
    child_log = tmp_path / "child.log"
    child_py = tmp_path / "child.py"
    child_py.write_text("import time\nfrom lmspec.watchdog import watch_parents\n"
                        "watch_parents('test worker', None)\ntime.sleep(60)\n")
    code = (f"import subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, {str(child_py)!r}], "
            f"stderr=open({str(child_log)!r}, 'w'))\n"
            "print(child.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the watchdog runs
    parent.kill()
    parent.wait()
    t0 = time.monotonic()
    assert wait_gone([child], 10) == [], "the child trained on after its parent died"
    assert time.monotonic() - t0 < 3
    text = child_log.read_text()
    assert f"error: its launcher process (pid {parent.pid}" in text and "test worker" in text


class FakeClient:
    """The coordination service's key-value store, in memory; ``dead`` stops writes."""

    def __init__(self):
        self.kv: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        self.kv[key] = value

    def key_value_try_get(self, key):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        if key not in self.kv:
            raise KeyError(key)
        return self.kv[key]


def _heartbeat(client, num=3, pid=0, timeout_s=0.3):
    from jaxlm.distributed import Heartbeat

    hb = Heartbeat.__new__(Heartbeat)
    hb.client, hb.num, hb.pid, hb.timeout_s, hb.count = client, num, pid, timeout_s, 0
    now = time.monotonic()
    hb.seen = {i: (None, now) for i in range(num) if i != pid}
    return hb


def test_heartbeat_names_the_peer_that_stopped():
    client = FakeClient()
    hb = _heartbeat(client)
    for _ in range(3):  # everyone beats: nothing to report
        client.kv["jaxlm/heartbeat/1"] = str(time.monotonic())
        client.kv["jaxlm/heartbeat/2"] = str(time.monotonic())
        assert hb.check() is None
        time.sleep(0.15)
    t0 = time.monotonic()
    msg = None
    while msg is None and time.monotonic() - t0 < 2:  # process 2 stops beating
        client.kv["jaxlm/heartbeat/1"] = str(time.monotonic())
        msg = hb.check()
        time.sleep(0.05)
    assert msg is not None and msg.startswith("process 2 of this 3-process job stopped")
    assert client.kv["jaxlm/heartbeat/0"] == str(hb.count)  # this process kept beating


def test_heartbeat_after_a_failed_collective_and_a_lost_coordinator():
    client = FakeClient()
    hb = _heartbeat(client, num=2, pid=1)
    client.kv["jaxlm/heartbeat/0"] = "7"  # process 0 wrote once, then nothing
    msg = hb.who_died(wait_s=0.2)
    assert msg is not None and msg.startswith("process 0 of this 2-process job died")
    client.down = True
    msg = hb.check()
    assert msg is not None and msg.startswith("process 0 (the coordinator")


def test_heartbeat_everyone_alive_explains_nothing():
    import threading

    client = FakeClient()
    hb = _heartbeat(client, num=2, pid=0)
    stop = threading.Event()

    def peer():
        n = 0
        while not stop.is_set():
            n += 1
            client.kv["jaxlm/heartbeat/1"] = str(n)
            time.sleep(0.02)

    t = threading.Thread(target=peer)
    t.start()
    try:
        assert hb.who_died(wait_s=0.2) is None  # a collective failed for another reason
    finally:
        stop.set()
        t.join()


def test_silent_death_is_named_before_the_peers_connection_errors(tmp_path):
    from torchlm.launch import silent_deaths

    (tmp_path / "rank-0.pid").write_text("100")
    (tmp_path / "rank-1.pid").write_text("101")
    err = tmp_path / "run" / "attempt_0" / "0" / "error.json"
    err.parent.mkdir(parents=True)
    err.write_text(json.dumps({"message": {"message": "Connection closed by peer"}}))
    assert silent_deaths(tmp_path) == ("rank 1 (pid 101) died without a Python error "
                                       "(killed by a signal or a native crash)")
    err.unlink()  # no error report anywhere: nothing tells the ranks apart
    assert silent_deaths(tmp_path) is None


def test_heartbeat_timeout_must_be_positive():
    from lmspec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="distributed.heartbeat_timeout_s"):
        load_config(TINY, ["distributed.heartbeat_timeout_s=0"])


# ----------------------------------------------------------------------------- slow


def _metrics_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _wait_steps(path: Path, n: int, procs: list[subprocess.Popen], timeout: float = 240):
    end = time.monotonic() + timeout
    while _metrics_lines(path) < n:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended before step {n}: "
                                 f"{[p.returncode for p in procs]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {n} steps within {timeout} s")
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _torch_job(tmp_path: Path):
    out = tmp_path / "run"
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchlm.cli", "train", str(TINY), f"train.out_dir={out}",
         "train.steps=2000", "train.eval_every=0", "zero.stage=1", "--no-progress"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_steps(out / "metrics.jsonl", 2, [proc])
    agent = _children(proc.pid)[0]
    workers = _children(agent)
    assert len(workers) == 2
    return proc, agent, workers, out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", ["agent", "launcher", "worker"])
def test_torchlm_job_ends_when_one_process_dies(tmp_path, victim):
    proc, agent, workers, out = _torch_job(tmp_path)
    pid = {"launcher": proc.pid, "agent": agent, "worker": workers[1]}[victim]
    try:
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        left = wait_gone([proc.pid, agent, *workers], LIMIT_S)
        took = time.monotonic() - t0
        assert left == [], f"still running {LIMIT_S} s after the {victim} died: {left}"
    finally:
        for p in (proc.pid, agent, *workers):
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
    proc.wait()
    log = (tmp_path / "train.log").read_text()
    print(f"{victim} SIGKILL: whole job gone after {took:.1f} s")
    if victim == "agent":
        assert proc.returncode == EXIT_PEER_LOST
        assert f"error: the torchrun agent (pid {agent}) was killed by SIGKILL" in log
    elif victim == "launcher":
        assert f"error: the torchlm launcher (pid {proc.pid}) died" in log
    else:
        assert proc.returncode == 1
        assert f"rank 1 (pid {workers[1]}) died without a Python error" in log
    # nothing half-written: the run folder still resumes (a complete checkpoint or none)
    assert (out / "metrics.jsonl").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jax_job(tmp_path: Path, heartbeat_s: float = 20.0):
    out = tmp_path / "run"
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2",
                   JAXLM_PROCESS_ID=str(pid))
        logs.append(tmp_path / f"p{pid}.log")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", "train", str(TINY), f"train.out_dir={out}",
             "train.steps=2000", "train.eval_every=0", "--no-progress",
             f"distributed.heartbeat_timeout_s={heartbeat_s}"],
            cwd=ROOT, env=env, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    _wait_steps(out / "metrics.jsonl", 2, procs)
    return procs, logs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0])
def test_jaxlm_two_processes_end_when_one_is_killed(tmp_path, victim):
    procs, logs = _jax_job(tmp_path)
    survivor = procs[1 - victim]
    try:
        procs[victim].kill()
        t0 = time.monotonic()
        survivor.wait(timeout=LIMIT_S)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"jaxlm process {victim} SIGKILL: process {1 - victim} gone after {took:.1f} s")
    text = logs[1 - victim].read_text()
    if victim == 1:
        assert survivor.returncode == EXIT_PEER_LOST, text[-3000:]
        assert "error: process 1 of this 2-process job died" in text
    else:
        # the coordinator's death: our heartbeat's line (exit 4), or JAX's own fatal
        # error handler when it polls the dead service first (SIGABRT)
        assert survivor.returncode in (EXIT_PEER_LOST, -signal.SIGABRT), text[-3000:]
        assert ("error: process 0 (the coordinator" in text
                or "another task died" in text), text[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_jaxlm_hung_process_ends_the_job_by_heartbeat(tmp_path):
    """SIGSTOP: the process keeps its sockets (no collective fails), only its heartbeat
    stops: the other process ends after distributed.heartbeat_timeout_s."""
    procs, logs = _jax_job(tmp_path, heartbeat_s=5.0)
    try:
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        procs[0].wait(timeout=LIMIT_S)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"jaxlm process 1 SIGSTOP: process 0 gone after {took:.1f} s")
    text = logs[0].read_text()
    assert procs[0].returncode == EXIT_PEER_LOST, text[-3000:]
    assert "error: process 1 of this 2-process job stopped its heartbeat 5 s ago" in text
    assert took >= 4.0  # not before the timeout

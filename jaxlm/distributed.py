"""Multi-process JAX start-up: ``jax.distributed.initialize`` when asked, and the
heartbeats that end the job when one of its processes dies.

The config (``distributed.*``) or the environment (``JAXLM_COORDINATOR``,
``JAXLM_NUM_PROCESSES``, ``JAXLM_PROCESS_ID``) asks for several processes; config
values win, empty/-1 config values fall back to the environment. Must run before any
other JAX call touches the devices.
"""

from __future__ import annotations

import os
import time

import jax

from lmspec.config import ConfigError, DistributedConfig

_INITIALIZED = False


def resolve(d: DistributedConfig, env: dict[str, str] | None = None
            ) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id), or None for a single process."""
    env = dict(os.environ if env is None else env)
    num = d.num_processes
    if num == 1 and env.get("JAXLM_NUM_PROCESSES"):
        try:
            num = int(env["JAXLM_NUM_PROCESSES"])
        except ValueError:
            raise ConfigError(
                f"JAXLM_NUM_PROCESSES={env['JAXLM_NUM_PROCESSES']!r}: expected an integer"
            ) from None
        if num < 1:
            raise ConfigError(f"JAXLM_NUM_PROCESSES={num} must be >= 1")
    if num == 1:
        return None
    addr = d.coordinator_address or env.get("JAXLM_COORDINATOR", "")
    if not addr:
        raise ConfigError(
            f"distributed.num_processes={num} needs distributed.coordinator_address or "
            "JAXLM_COORDINATOR (host:port of process 0)"
        )
    pid = d.process_id
    if pid < 0:
        raw = env.get("JAXLM_PROCESS_ID", "")
        try:
            pid = int(raw)
        except ValueError:
            raise ConfigError(
                f"distributed.num_processes={num} needs distributed.process_id or "
                f"JAXLM_PROCESS_ID (an integer in [0, {num})), got {raw!r}"
            ) from None
    if not 0 <= pid < num:
        raise ConfigError(f"process id {pid} must be in [0, {num})")
    return addr, num, pid


def maybe_initialize(d: DistributedConfig) -> bool:
    """Call ``jax.distributed.initialize`` if several processes are asked for, and start
    this process's heartbeat (:class:`Heartbeat`); True then."""
    global _INITIALIZED, HEARTBEAT
    spec = resolve(d)
    if spec is None or _INITIALIZED:
        return _INITIALIZED
    addr, num, pid = spec
    # CPU devices of several processes talk through gloo; no effect on GPU clients.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid)
    _INITIALIZED = True
    HEARTBEAT = Heartbeat(num, pid, d.heartbeat_timeout_s)
    HEARTBEAT.start()
    return True


HEARTBEAT: Heartbeat | None = None


_KEY = "jaxlm/heartbeat/{}"


class Heartbeat:
    """Each process counts up a key in the JAX coordination service's key-value store
    every second and watches the others' counters (:mod:`lmspec.watchdog`).

    A peer whose counter has not moved for ``timeout_s`` died or hangs: this process
    ends (exit status 4) with a line naming it, instead of waiting in a collective or in
    ``jax.distributed``'s own heartbeat timeout (100 s, then an abort). When the store
    itself is gone, process 0 (which serves it) died. A collective that fails because a
    peer vanished (gloo: "connection reset by peer") is explained by :meth:`who_died`."""

    INTERVAL_S = 1.0

    def __init__(self, num: int, pid: int, timeout_s: float) -> None:
        from jax._src.distributed import global_state

        self.client = global_state.client
        self.num, self.pid, self.timeout_s = num, pid, timeout_s
        self.count = 0
        now = time.monotonic()
        self.seen: dict[int, tuple[str | None, float]] = {
            i: (None, now) for i in range(num) if i != pid}
        self.dog = None

    def start(self) -> None:
        from lmspec.watchdog import Watchdog

        self.beat()
        self.dog = Watchdog([self.check], interval=self.INTERVAL_S, name="jaxlm-heartbeat")
        self.dog.start()

    def _who(self) -> str:
        return f"jaxlm process {self.pid} of {self.num} (pid {os.getpid()})"

    def beat(self) -> str | None:
        """Write this process's counter; a message when the coordinator is gone."""
        self.count += 1
        try:
            self.client.key_value_set(_KEY.format(self.pid), str(self.count),
                                      allow_overwrite=True)
        except Exception as e:  # noqa: BLE001 - any failure: the service is gone
            return (f"process 0 (the coordinator, which keeps the heartbeats) died or is "
                    f"unreachable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                    f"{self._who()} stops")
        return None

    def stale(self) -> list[int]:
        """Peers whose counter has not moved for ``timeout_s``."""
        now = time.monotonic()
        out = []
        for i, (last, since) in self.seen.items():
            try:
                value = self.client.key_value_try_get(_KEY.format(i))
            except Exception:  # noqa: BLE001 - not written yet
                value = None
            if value != last:
                self.seen[i] = (value, now)
            elif now - since > self.timeout_s:
                out.append(i)
        return out

    def check(self) -> str | None:
        gone = self.beat()
        if gone is not None:
            return gone
        dead = self.stale()
        if dead:
            return (f"{_processes(dead)} of this {self.num}-process job stopped its "
                    f"heartbeat {self.timeout_s:.0f} s ago (died or hangs); {self._who()} "
                    "stops (checkpoints up to the last complete one are kept)")
        return None

    def who_died(self, wait_s: float = 3.0) -> str | None:
        """After a failed collective: the peers whose counters do not move within
        ``wait_s`` (a message naming them), or None when everyone is alive."""
        before = {}
        for i in self.seen:
            try:
                before[i] = self.client.key_value_try_get(_KEY.format(i))
            except Exception:  # noqa: BLE001
                before[i] = None
        time.sleep(wait_s)
        gone = self.beat()
        if gone is not None:
            return gone
        dead = []
        for i, value in before.items():
            try:
                now = self.client.key_value_try_get(_KEY.format(i))
            except Exception:  # noqa: BLE001
                now = None
            if now == value:
                dead.append(i)
        if not dead:
            return None
        return (f"{_processes(dead)} of this {self.num}-process job died (its heartbeat "
                f"stopped; a collective with it failed); {self._who()} stops "
                "(checkpoints up to the last complete one are kept)")


def _processes(ids: list[int]) -> str:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def explain_collective_failure(e: BaseException) -> None:
    """In a multi-process job, a runtime error from a collective whose peer died ends
    this process with a line naming the dead process (exit status 4); any other error
    returns (the caller re-raises it)."""
    if HEARTBEAT is None:
        return
    from lmspec.watchdog import die

    msg = HEARTBEAT.who_died()
    if msg is not None:
        die(f"{msg}. The collective's error: {str(e).splitlines()[0][:200]}")

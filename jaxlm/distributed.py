"""Multi-process JAX start-up: ``jax.distributed.initialize`` when asked.

The config (``distributed.*``) or the environment (``JAXLM_COORDINATOR``,
``JAXLM_NUM_PROCESSES``, ``JAXLM_PROCESS_ID``) asks for several processes; config
values win, empty/-1 config values fall back to the environment. Must run before any
other JAX call touches the devices.
"""

from __future__ import annotations

import os

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
    """Call ``jax.distributed.initialize`` if several processes are asked for; True then."""
    global _INITIALIZED
    spec = resolve(d)
    if spec is None or _INITIALIZED:
        return _INITIALIZED
    addr, num, pid = spec
    # CPU devices of several processes talk through gloo; no effect on GPU clients.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid)
    _INITIALIZED = True
    return True

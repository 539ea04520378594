"""Feeding the train step: each process builds only the rows of the global batch its
devices hold, puts them on those devices, and hashes exactly those rows.

Shape legend: M micro-batches per optimizer step, B rows per micro-batch (all data-parallel
ranks), T sequence length; a batch is (M, B, T+1) token windows sharded on B.

Batch identity (issue 9): every row a process puts on its devices is hashed with
:func:`lmspec.data.row_digests` from the same numpy array that was transferred, so a row
read wrongly for one device changes the logged ``batch_fingerprint`` and the
``batch_fingerprint_parts`` entry of that micro-step and data-parallel rank. With several
processes, each publishes its digests through the JAX distributed key-value store (host
to host, nothing queued on the devices) and process 0 combines them in global row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from lmspec.data import combine_row_digests, fingerprint_parts, row_digests

KV_TIMEOUT_MS = 300_000  # how long process 0 waits for another process's digests


@dataclass
class FedBatch:
    """One optimizer step's batch as put on the devices, with the digests (M, B) of the
    rows this process put there (``held`` marks them; other processes hold the rest)."""

    step: int
    array: jax.Array
    digests: np.ndarray
    held: np.ndarray


class Batches:
    """Global batches (M, B, T+1) of an ``lmspec.data.Dataset`` for a mesh's batch sharding.

    ``rows`` is the one place a process reads token rows; everything it returns is what
    the devices get and what is hashed.
    """

    def __init__(self, dataset: Any, batch_shape: tuple[int, int, int],
                 batch_sharding: NamedSharding, global_batch_size: int) -> None:
        self.ds = dataset
        self.batch_shape = batch_shape
        self.sharding = batch_sharding
        self.global_batch_size = global_batch_size

    def rows(self, step: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of step ``step``'s global batch (int32, (n, T+1)); global
        row ``m * B + r`` is row ``r`` of micro-batch ``m``."""
        return self.ds.global_batch_rows(step, start, stop)

    def train(self, step: int) -> FedBatch:
        """Step ``step``'s batch on this process's devices (the transfer is asynchronous)."""
        m_count, b, _ = self.batch_shape
        digests = np.zeros((m_count, b), np.uint64)
        held = np.zeros((m_count, b), bool)
        blocks: dict[tuple[int, int, int, int], np.ndarray] = {}
        shards = []
        index_map = self.sharding.addressable_devices_indices_map(self.batch_shape)
        for device, index in index_map.items():
            m0, m1 = _bounds(index[0], m_count)
            r0, r1 = _bounds(index[1], b)
            key = (m0, m1, r0, r1)
            if key not in blocks:
                block = np.stack([self.rows(step, m * b + r0, m * b + r1)
                                  for m in range(m0, m1)])
                blocks[key] = block
                digests[m0:m1, r0:r1] = row_digests(block).reshape(m1 - m0, r1 - r0)
                held[m0:m1, r0:r1] = True
            shards.append(jax.device_put(blocks[key][:, :, index[2]], device))
        array = jax.make_array_from_single_device_arrays(self.batch_shape, self.sharding,
                                                         shards)
        if jax.process_count() > 1:
            _publish(step, digests, held)
        return FedBatch(step=step, array=array, digests=digests, held=held)

    def val(self, index: int) -> jax.Array:
        """Validation batch ``index`` (the same on every call), sharded like a train batch."""
        w = self.ds.val_batch(index, self.global_batch_size).reshape(self.batch_shape)
        return jax.make_array_from_callback(w.shape, self.sharding, lambda idx: w[idx])


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    assert step == 1, s
    return start, stop


def global_digests(batch: FedBatch) -> np.ndarray | None:
    """The (M, B) digests of the whole global batch in global row order. With several
    processes: on process 0, after the others have published theirs; None on the others
    (only process 0 writes records)."""
    if jax.process_count() == 1:
        assert batch.held.all(), "one process must hold every row"
        return batch.digests
    client = _client()
    if client is None:
        return _allgather(batch)
    if jax.process_index() != 0:
        return None
    return _from_store(client, batch)


def fingerprints(batch: FedBatch, rows_per_part: int) -> tuple[str, list[str]] | None:
    """``(batch_fingerprint, batch_fingerprint_parts)`` of the rows actually fed (None on
    processes other than 0 when several run)."""
    d = global_digests(batch)
    if d is None:
        return None
    d = d.reshape(-1)
    return combine_row_digests(d), fingerprint_parts(d, rows_per_part)


# ----------------------------------------------------------------------------- processes


def _client() -> Any:
    from jax._src import distributed  # the client jax itself uses to share compiled code

    client = distributed.global_state.client
    if client is None or not hasattr(client, "blocking_key_value_get_bytes"):
        return None
    return client


def _key(step: int, process: int) -> str:
    return f"jaxlm/batch_digests/{step}/{process}"


def _publish(step: int, digests: np.ndarray, held: np.ndarray) -> None:
    client = _client()
    if client is not None:
        payload = digests.astype("<u8").tobytes() + held.astype(np.uint8).tobytes()
        client.key_value_set_bytes(_key(step, jax.process_index()), payload)


def _merge(batch: FedBatch, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    out = np.zeros(batch.digests.shape, np.uint64)
    seen = np.zeros(batch.digests.shape, bool)
    for d, h in parts:
        out[h] = d[h]
        seen |= h
    if not seen.all():
        missing = np.argwhere(~seen)[:4].tolist()
        raise RuntimeError(f"step {batch.step}: no process fed rows (micro, row) {missing}")
    return out


def _from_store(client: Any, batch: FedBatch) -> np.ndarray:
    shape = batch.digests.shape
    n = int(np.prod(shape))
    parts = []
    for p in range(jax.process_count()):
        raw = client.blocking_key_value_get_bytes(_key(batch.step, p), KV_TIMEOUT_MS)
        d = np.frombuffer(raw[:8 * n], "<u8").reshape(shape)
        h = np.frombuffer(raw[8 * n:], np.uint8).reshape(shape).astype(bool)
        parts.append((d, h))
    return _merge(batch, parts)


def _allgather(batch: FedBatch) -> np.ndarray:
    """Fallback without a key-value store: a device all-gather (every process calls it;
    it waits behind the queued steps). uint64 travels as two uint32 (x64 is off)."""
    shape = batch.digests.shape
    both = np.stack([batch.digests.view(np.uint32).reshape(*shape, 2),
                     np.repeat(batch.held[..., None], 2, axis=-1).astype(np.uint32)])
    got = np.asarray(multihost_utils.process_allgather(both))  # (P, 2, M, B, 2)
    parts = [(np.ascontiguousarray(g[0]).view(np.uint64).reshape(shape),
              g[1, ..., 0].astype(bool)) for g in got]
    return _merge(batch, parts)


def forget(step: int) -> None:
    """Drop step ``step``'s published digests from the key-value store (process 0, after
    the record is written), so the store does not grow with the run."""
    client = _client()
    if client is None or jax.process_index() != 0 or not hasattr(client, "key_value_delete"):
        return
    for p in range(jax.process_count()):
        client.key_value_delete(_key(step, p))

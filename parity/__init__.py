"""Parity harness: feeds the JAX trainer (``jaxlm``) and the DeepSpeed reference
(``torchlm``) identical weights and batches and proves, step by step, that they train the
same way, and how fast each does it.

- ``parity run CONFIG --out DIR`` (:mod:`parity.run`): forward logits, step-0 gradients and
  first AdamW update judged against a float64 truth (:mod:`parity.truth`,
  :mod:`parity.judge`), loss curves against noise measured between DeepSpeed runs, batch
  fingerprints; report.json/.md/.html. Phases in :mod:`parity.launch`,
  :mod:`parity.forward`, :mod:`parity.checks`, :mod:`parity.diagnosis`,
  :mod:`parity.envinfo`.
- ``parity bench CONFIG`` (:mod:`parity.bench_cmd`): throughput of both on identical work.
- pytest plugin (:mod:`parity.pytest_plugin`): the ``run_parity`` fixture and ``parity``
  marker.

Limits live in :mod:`parity.limits`, the maths in :mod:`parity.compare` and
:mod:`parity.judge`, the writers in
:mod:`parity.report`. Nothing here imports jax or torch at import time.
"""

"""Parity harness: feeds the JAX trainer (``jaxlm``) and the DeepSpeed reference
(``torchlm``) identical weights and batches and proves, step by step, that they train the
same way, and how fast each does it.

- ``parity run CONFIG --out DIR`` (:mod:`parity.run`): forward logits vs torch and Hugging
  Face, step-0 gradients and first AdamW update, per-step loss / grad norm / LR and batch
  fingerprints, with noise floors measured in the same run; report.json/.md/.html.
- ``parity bench CONFIG`` (:mod:`parity.bench_cmd`): throughput of both on identical work.
- pytest plugin (:mod:`parity.pytest_plugin`): the ``run_parity`` fixture and ``parity``
  marker.

Limits live in :mod:`parity.limits`, the maths in :mod:`parity.compare`, the writers in
:mod:`parity.report`. Nothing here imports jax or torch at import time.
"""

"""Flax NNX Llama and its jit-sharded trainer (see docs/jaxlm.md).

Public entry points: :class:`jaxlm.model.Llama`, :mod:`jaxlm.weights` (HF safetensors),
:mod:`jaxlm.api` (single-device ``logits`` / ``loss_and_grads``), :func:`jaxlm.trainer.train`
and the ``jaxlm`` command line (:mod:`jaxlm.cli`).
"""

"""In-process bf16 probes: the bf16 policy questions the training runs cannot separate.

A bf16 run's step-0 loss, gradients and logits are each dominated by the rounding of the
bf16 weights and activations, which any bf16 implementation carries. A policy difference
that adds "one more bf16 rounding" somewhere (norm statistics computed in bf16, gradients
summed over micro-steps in a bf16 accumulator) hides in it: both are "as accurate as bf16"
(issue 9 measured a bf16 accumulator at 1.1-1.6x a clean port's distance from float64).
Two probes look where such a difference is not hidden, each against a reference that is
two faithful bf16 implementations, on the same inputs, in this process:

- **activations** (``bf16.activations``): the step-0 activations layer by layer (as
  :mod:`parity.localize` captures them: embedding, each block's input norm, attention,
  post-attention norm and MLP, final norm, logits). JAX bf16's distance from torch bf16
  at each point against the distance between two faithful torch bf16 implementations
  (Hugging Face's and torchlm's) at that point, plus a fraction of torch bf16's distance
  from float64 (where the two happen to round identically). The first layers are where a
  policy difference is not yet buried under every earlier rounding.
- **loss function** (``bf16.loss_fn``): each side's loss function alone, on the same
  input: torch bf16's logits of the step-0 batch. JAX's d loss / d logits (the trainer's
  loss function with the model's logits replaced, ``jaxlm.api.loss_on_logits``) against
  float64, within a multiple of torchlm's distance plus the fp32 rounding floor (the
  loss is an fp32 computation on both sides: a log-softmax in bf16 is ~1e4x over);
  Hugging Face's ``ForCausalLMLoss`` is recorded beside it as a second reference.
- **accumulation** (``bf16.accum``): how much the bf16 gradient of one batch changes when
  it is summed over many micro-steps instead of computed in one. Each side computes
  ``PROBE_ROWS`` windows as one micro-batch and as ``PROBE_ROWS`` micro-batches of one row
  with its trainer's own code (``jaxlm.api.loss_and_grads``: the trainer's loss function
  and accumulator; ``torchlm.api.loss_and_grads``: torch bf16 gradients summed in fp32,
  what DeepSpeed's ``grad_accum_dtype: fp32`` does). Per tensor, the ratio of JAX's change
  to torch's; the check is the median ratio over tensors (an accumulation policy acts on
  every tensor; the median is not moved by one tensor whose reduction differs). A bf16
  accumulator's rounding grows with the number of micro-steps while faithful per-micro
  rounding does not, so many micro-steps of short windows separate the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig
from parity import compare as C
from parity import judge as J
from parity import limits as L

PROBE_ROWS = 64  # windows of the accumulation probe: 64 micro-steps against one
PROBE_TOKENS = 32  # tokens per window (the policy does not depend on the length)
LOSS_FN_CHECK = ("bf16 loss function: d loss / d logits on torch bf16's logits vs "
                 "float64")


def probe_windows(cfg: ExperimentConfig, ds: Any) -> np.ndarray:
    """``PROBE_ROWS`` training windows (the first global batches, in order), cut to
    ``PROBE_TOKENS`` + 1 columns."""
    rows, s = [], 0
    while sum(len(r) for r in rows) < PROBE_ROWS:
        rows.append(ds.global_batch(s))
        s += 1
    w = np.concatenate(rows)[:PROBE_ROWS]
    return np.ascontiguousarray(w[:, :min(PROBE_TOKENS, cfg.data.seq_len) + 1])


def accumulation_ratios(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                        windows: np.ndarray) -> dict[str, float]:
    """Per tensor: ||g_jax(n micro) - g_jax(1)|| / ||g_torch(n micro) - g_torch(1)||
    in bf16, n = rows of ``windows``. A tensor neither side changes counts as 1."""
    from jaxlm import api as japi
    from torchlm import api as tapi

    n = windows.shape[0]
    w = dict(weights)
    delta = {}
    for side, api in (("jax", japi), ("torch", tapi)):
        _, g1 = api.loss_and_grads(cfg, w, windows, "bf16", 1)
        _, gn = api.loss_and_grads(cfg, w, windows, "bf16", n)
        delta[side] = {k: float(np.linalg.norm(np.asarray(gn[k], np.float64)
                                               - np.asarray(g1[k], np.float64)))
                       for k in g1}
    out = {}
    for k, dt in delta["torch"].items():
        dj = delta["jax"][k]
        out[k] = 1.0 if dj == dt == 0.0 else (math.inf if dt == 0.0 else dj / dt)
    return out


def judge_accumulation(ratios: Mapping[str, float]) -> J.Judged:
    r = np.asarray(list(ratios.values()), np.float64)
    worst = max(ratios, key=lambda k: ratios[k])
    med = float(np.median(r)) if r.size else math.nan
    return J.Judged(value=med, limit=L.limit("bf16.accum").threshold, noise=1.0,
                    detail={"micro_steps": PROBE_ROWS, "tokens_per_window": PROBE_TOKENS,
                            "tensors": int(r.size),
                            "ratio_p10_p90": [float(np.percentile(r, 10)),
                                              float(np.percentile(r, 90))] if r.size else [],
                            "worst_tensor": worst, "worst_ratio": float(ratios[worst])})


def loss_fn_gradients(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                      windows: np.ndarray, torch_logits: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """d loss / d logits of ``windows`` (B, T+1) on the same logits, torch bf16's forward
    of the windows (``torch_logits`` when already computed, e.g. by the activation probe):
    ``jax`` (the trainer's loss function, ``jaxlm.api.loss_on_logits``), ``torch``
    (torchlm's ``token_loss``), ``hf`` (Hugging Face's ``ForCausalLMLoss``), each in fp32,
    and ``f64`` (torchlm's loss in float64)."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from jaxlm import api as japi
    from torchlm import api as tapi
    from torchlm.model import token_loss

    w = torch.from_numpy(np.asarray(windows, np.int64))
    if torch_logits is None:
        tapi.configure_torch()
        model = tapi.build_model(cfg.model, dict(weights), "bf16")
        with torch.no_grad():
            logits16 = model(w[:, :-1])
    else:  # float64 copies of bf16-model logits: the values convert back exactly
        logits16 = torch.from_numpy(np.asarray(torch_logits)).to(torch.float32)
    targets = w[:, 1:]
    out = {}
    for name, dtype, loss in (
            ("torch", torch.float32, lambda x: token_loss(x, targets)),
            ("f64", torch.float64, lambda x: token_loss(x, targets)),
            ("hf", torch.float32, lambda x: ForCausalLMLoss(
                x, None, cfg.model.vocab_size, shift_labels=targets.contiguous()))):
        x = logits16.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf
        with torch.enable_grad():
            loss(x).backward()
        out[name] = x.grad.detach().to(torch.float64).numpy()
    _, out["jax"] = japi.loss_on_logits(cfg, dict(weights), np.asarray(windows),
                                         logits16.float().numpy(), "bf16")
    return out


def judge_loss_fn(grads: Mapping[str, np.ndarray]) -> J.Judged:
    j = J.judge_tensor(grads["jax"], grads["torch"], grads["f64"],
                       L.limit("bf16.loss_fn").threshold)
    hf = J.judge_tensor(grads["hf"], grads["torch"], grads["f64"],
                        L.limit("bf16.loss_fn").threshold)
    j.detail["hugging_face_vs_float64"] = hf.value
    return j


def judge_activations(rows: list[Any]) -> J.Judged:
    """The activation (a :class:`parity.localize.Row`) with the largest err / limit."""
    worst = max(rows, key=lambda r: J.safe_margin(r.err, r.limit))
    first = next((r.name for r in rows if r.over), None)
    return J.Judged(value=float(worst.err), limit=float(worst.limit), noise=float(worst.noise),
                    detail={"point": worst.name, "first_over": first,
                            "points": len(rows)})


def bf16_probe_checks(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                      batch0: np.ndarray, ds: Any, truth: Any = None
                      ) -> tuple[list[C.Check], dict[str, Any]]:
    """The two bf16 probe checks and their per-point/per-tensor figures. ``truth`` is a
    :class:`parity.localize.Truth` of ``batch0`` to share with the diagnosis."""
    from parity import localize as Z

    truth = truth if truth is not None else Z.Truth(cfg, weights, batch0)
    rows = Z.bf16_forward_rows(truth, Z.activation_names(cfg.model.num_hidden_layers))
    truth["rows_forward_bf16"] = rows
    act = judge_activations(rows)
    lfn = judge_loss_fn(loss_fn_gradients(cfg, weights, batch0, truth["torch16"]["logits"]))
    ratios = accumulation_ratios(cfg, weights, probe_windows(cfg, ds))
    acc = judge_accumulation(ratios)
    checks = [
        C.judged_check("bf16 forward: activations layer by layer vs torch bf16 (worst point)",
                       "bf16.activations", act,
                       noise_from="Hugging Face bf16 vs torch bf16 at that point"),
        C.judged_check(LOSS_FN_CHECK, "bf16.loss_fn", lfn,
                       noise_from="torch's loss on the same logits vs float64"),
        C.judged_check(f"bf16 accumulation: gradient change over {PROBE_ROWS} micro-steps, "
                       "jax / torch (median tensor)", "bf16.accum", acc,
                       noise_from="torch bf16 with fp32 accumulation (DeepSpeed's "
                                  "grad_accum_dtype fp32)"),
    ]
    return checks, {"activations": [r.to_dict() for r in rows], "accumulation": ratios}


def failed_probe_checks(why: str) -> list[C.Check]:
    return [C.nan_check("bf16 forward: activations layer by layer vs torch bf16 (worst point)",
                        "bf16.activations", why),
            C.nan_check(LOSS_FN_CHECK, "bf16.loss_fn", why),
            C.nan_check(f"bf16 accumulation: gradient change over {PROBE_ROWS} micro-steps, "
                        "jax / torch (median tensor)", "bf16.accum", why)]

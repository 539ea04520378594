"""Forward comparison: in-process logits of JAX, torch and Hugging Face on a validation
batch, each judged against the float64 logits of the same weights (:mod:`parity.truth`),
with torch's distance from them as the noise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lmspec.config import ExperimentConfig
from parity import compare as C
from parity import judge as J
from parity import limits as L

FORWARD_ROWS = 4  # validation windows in the forward comparison


def forward_batch(cfg: ExperimentConfig, ds) -> np.ndarray:  # noqa: ANN001 - a Dataset
    """Token ids (B, T) of the forward comparison: validation windows (or, without a
    validation split, the first rows of step 0's batch)."""
    rows = min(FORWARD_ROWS, cfg.train.global_batch_size)
    val = ds.val_batch(0, rows) if ds.num_val_windows else ds.global_batch(0)[:rows]
    return val[:, :-1]


def forward_logits(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                   tokens_bt: np.ndarray, precisions: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """In-process logits: ``jax <prec>``, ``torch <prec>`` for each precision and
    ``hf fp32``. JAX is imported here, not at module import."""
    from jaxlm import api as japi
    from torchlm import api as tapi

    w = dict(weights)
    out = {}
    for prec in precisions:
        out[f"jax {prec}"] = np.asarray(japi.logits(cfg, w, tokens_bt, prec), np.float32)
        out[f"torch {prec}"] = np.asarray(tapi.logits(cfg, w, tokens_bt, prec), np.float32)
    out["hf fp32"] = np.asarray(tapi.hf_logits(cfg, w, tokens_bt), np.float32)
    return out


FORWARD_CHECKS = (
    # (test, reference, key, name)
    ("jax fp32", "torch fp32", "fp32.logits", "fp32 forward: logits vs float64, jax"),
    ("hf fp32", "torch fp32", "fp32.logits", "fp32 forward: logits vs float64, Hugging Face"),
    ("jax bf16", "torch bf16", "bf16.logits", "bf16 forward: logits vs float64, jax"),
)


def forward_checks(logits: Mapping[str, np.ndarray], truth_btv: np.ndarray | None
                   ) -> tuple[dict[str, dict[str, float]], list[C.Check], list[dict]]:
    """Forward statistics (pairwise), the judged logits checks and info figures."""
    stats: dict[str, dict[str, float]] = {}
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs = [("jax fp32", "torch fp32"), ("jax fp32", "hf fp32"), ("torch fp32", "hf fp32"),
             ("jax bf16", "torch bf16"), ("jax bf16", "hf fp32"), ("torch bf16", "hf fp32")]
    for test, ref in pairs:
        if test in logits and ref in logits:
            stats[f"{test} vs {ref}"] = C.logits_stats(logits[test], logits[ref])
    if truth_btv is not None:
        for name in logits:
            stats[f"{name} vs float64"] = C.logits_stats(logits[name], truth_btv)
        for test, ref, key, name in FORWARD_CHECKS:
            if test in logits and ref in logits:
                j = J.judge_tensor(logits[test], logits[ref], truth_btv,
                                   L.limit(key).threshold)
                checks.append(C.judged_check(
                    name, key, j, noise_from=f"{ref} vs float64",
                    max_abs=stats[f"{test} vs float64"]["max_abs"]))
    for key, s in stats.items():
        info.append({"name": f"forward {key}: max abs diff", "value": s["max_abs"],
                     "note": f"max rel {s['max_rel']:.3e}, mean KL {s['mean_kl']:.3e}"})
    return stats, checks, info

"""The in-process bf16 probes (parity.probes) on a small model: a faithful JAX port
passes all three, a bf16 gradient accumulator fails the accumulation probe, RMSNorm
statistics in bf16 fail the activation probe, a log-softmax in bf16 fails the loss
function probe (each plant from tests/plants/)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.weights import init_weights
from parity import localize as Z
from parity import probes as P

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "plants"))
import parity_plants  # noqa: E402

SMALL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=300",
         "data.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def small():
    cfg = load_config(ROOT / "configs/tiny.yaml", SMALL)
    w = init_weights(cfg.model, 5)
    # text-like token statistics: a few frequent ids, like bytes of text
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, size=(P.PROBE_ROWS, P.PROBE_TOKENS + 1)) % cfg.model.vocab_size
    return cfg, w, ids.astype(np.int64)


def _accum(cfg, w, windows):
    return P.judge_accumulation(P.accumulation_ratios(cfg, w, windows))


def _activations(cfg, w, windows):
    truth = Z.Truth(cfg, w, windows[:8])
    return P.judge_activations(Z.bf16_forward_rows(truth, Z.activation_names(2)))


def _planted(name, probe, *args):
    """``probe(*args)`` with plant ``name`` applied for the call."""
    undo = parity_plants.apply(name)
    try:
        return probe(*args)
    finally:
        undo()


def _loss_fn(cfg, w, windows):
    return P.judge_loss_fn(P.loss_fn_gradients(cfg, w, windows[:8]))


def test_faithful_port_passes_every_probe(small):
    cfg, w, windows = small
    acc, act, lfn = _accum(cfg, w, windows), _activations(cfg, w, windows), _loss_fn(
        cfg, w, windows)
    assert acc.passed, acc
    assert act.passed, act
    assert lfn.passed, lfn
    # Hugging Face's loss, a second faithful fp32 implementation, is as close
    assert lfn.detail["hugging_face_vs_float64"] <= lfn.limit
    assert acc.detail["tensors"] == len(w) and acc.detail["micro_steps"] == P.PROBE_ROWS


def test_bf16_accumulator_fails_the_accumulation_probe(small):
    cfg, w, windows = small
    acc = _planted("bf16_grad_accum", _accum, cfg, w, windows)
    assert not acc.passed, acc


def test_norm_statistics_in_bf16_fail_the_activation_probe(small):
    cfg, w, windows = small
    act = _planted("bf16_norm_stats", _activations, cfg, w, windows)
    assert not act.passed, act
    assert act.detail["first_over"] == "layer 0 input_layernorm"


def test_log_softmax_in_bf16_fails_the_loss_function_probe(small):
    cfg, w, windows = small
    lfn = _planted("bf16_softmax_loss", _loss_fn, cfg, w, windows)
    assert not lfn.passed, lfn
    assert lfn.margin > 100


def test_probe_windows_take_consecutive_batches():
    class DS:
        def global_batch(self, s):
            return np.full((8, 129), s)

    cfg = load_config(ROOT / "configs/tiny.yaml", [])
    w = P.probe_windows(cfg, DS())
    assert w.shape == (P.PROBE_ROWS, P.PROBE_TOKENS + 1)
    assert list(w[::8, 0]) == list(range(P.PROBE_ROWS // 8))

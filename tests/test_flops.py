"""lmspec.flops: the PaLM formula against a count done by hand, and the peak table."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lmspec.config import ModelConfig
from lmspec.flops import flops_per_token, mfu, num_params, peak_flops
from lmspec.weights import param_shapes

# d=64, f=128, L=2 layers, H=4 query heads, 2 KV heads, head dim Q=16, vocab 100
SMALL = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64)
T = 32

# hand count, one layer:
#   q_proj 64*64 = 4096, k_proj 64*32 = 2048, v_proj 64*32 = 2048, o_proj 64*64 = 4096
#   -> attention 12288
#   gate 64*128 = 8192, up 8192, down 8192 -> mlp 24576
#   two RMSNorm gains 2*64 = 128
#   -> 36992 per layer, 73984 for two layers
# + final norm 64                     -> 74048
# + lm_head 100*64 = 6400             -> 80448  (N: embedding excluded, lm_head included)
# + embed_tokens 100*64 = 6400        -> 86848  (all parameters)
N_HAND = 80448
ALL_HAND = 86848
# attention term 12 * L * H * Q * T = 12 * 2 * 4 * 16 * 32 = 49152
FLOPS_HAND = 6 * N_HAND + 49152  # = 531840


def test_num_params_hand_count():
    assert num_params(SMALL) == ALL_HAND
    assert num_params(SMALL, include_embedding=False) == N_HAND
    # independent of the formula: the sum over the named weight shapes
    assert sum(math.prod(s) for s in param_shapes(SMALL).values()) == ALL_HAND


def test_tied_embeddings():
    tied = dataclasses.replace(SMALL, tie_word_embeddings=True)
    # one 100x64 matrix fewer in memory ...
    assert num_params(tied) == ALL_HAND - 6400
    assert sum(math.prod(s) for s in param_shapes(tied).values()) == ALL_HAND - 6400
    # ... but the lm_head matmul is still done, so the FLOPs do not change
    assert num_params(tied, include_embedding=False) == N_HAND
    assert flops_per_token(tied, T) == FLOPS_HAND


def test_flops_per_token_hand_count():
    assert flops_per_token(SMALL, T) == 531840 == FLOPS_HAND
    # the attention term grows linearly with T, the 6N term does not
    assert flops_per_token(SMALL, 2 * T) - flops_per_token(SMALL, T) == 49152


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("nvidia h200 nvl", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None),
    ("TFRT_CPU_0", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("", None),
    (None, None),
])
def test_peak_table(name, peak):
    assert peak_flops(name) == peak


def test_mfu():
    # 1e9 tokens/s on an H100 SXM: 1e9 * 531840 / 989e12
    assert mfu(1e9, SMALL, T, "NVIDIA H100 80GB HBM3") == pytest.approx(531840e9 / 989e12)
    assert mfu(1e9, SMALL, T, "cpu") is None
    assert mfu(1e9, SMALL, T, None) is None

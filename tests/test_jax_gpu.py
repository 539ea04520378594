"""JAX on an NVIDIA GPU: cuDNN flash attention against XLA's attention on the same
weights, a bf16 training run of ``tiny`` with the GPU defaults, and the parity run of
``tiny`` with DeepSpeed at world size 1. Marked ``gpu`` (CI deselects them; ``pytest -m
gpu`` on a GPU machine runs them) and skipped where JAX sees no GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lmspec.config import load_config  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs an NVIDIA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# cuDNN's flash kernel and XLA's attention both round q, k, v and the probabilities to
# bf16 but in different places (flash: per tile, against a running max; XLA: once, after
# an fp32 softmax), so neither is systematically closer to the fp32 result. Each must stay
# within this multiple of the other's distance from the fp32 logits; a semantic error (a
# wrong causal mask, scale or kv-head mapping) moves logits by a large fraction of their
# spread, far beyond bf16 rounding.
ATTN_NOISE_MULTIPLE = 2.0


def _model_logits(cfg, weights, tokens, dtype, attention: str) -> tuple[np.ndarray, str]:
    from jaxlm.model import Llama
    from jaxlm.weights import from_hf

    model = Llama(cfg.model, rngs=nnx.Rngs(0), dtype=dtype, attention=attention)
    from_hf(model, weights)
    graphdef, params = nnx.split(model)

    @jax.jit
    def fwd(params, tokens_bt):
        cast = jax.tree.map(lambda p: p.astype(dtype), params)
        return nnx.merge(graphdef, cast)(tokens_bt)

    tokens = jnp.asarray(tokens, jnp.int32)
    hlo = fwd.lower(params, tokens).compile().as_text()
    with jax.default_matmul_precision("float32" if dtype == jnp.float32 else "default"):
        out = fwd(params, tokens)
    return np.asarray(out, np.float64), hlo


def _rms_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def test_cudnn_attention_matches_xla_in_bf16() -> None:
    from lmspec.weights import init_weights

    cfg = load_config(TINY)
    w = init_weights(cfg.model, 5)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    ref, _ = _model_logits(cfg, w, tokens, jnp.float32, "xla")
    xla, _ = _model_logits(cfg, w, tokens, jnp.bfloat16, "xla")
    cud, hlo = _model_logits(cfg, w, tokens, jnp.bfloat16, "cudnn")
    assert "cudnn" in hlo.lower()  # the flash kernel is really used
    e_xla, e_cud = _rms_rel(xla, ref), _rms_rel(cud, ref)
    print(f"bf16 logits vs fp32: xla {e_xla:.2e}, cudnn {e_cud:.2e}, "
          f"cudnn vs xla {_rms_rel(cud, xla):.2e}")
    assert 0 < e_xla < 0.05  # bf16 is really bf16, and close to fp32
    assert e_cud <= ATTN_NOISE_MULTIPLE * e_xla
    assert e_xla <= ATTN_NOISE_MULTIPLE * e_cud


def test_bf16_training_of_tiny_on_gpu(tmp_path) -> None:
    from jaxlm.trainer import train

    cfg = load_config(TINY, [f"train.out_dir={tmp_path}", "train.steps=12",
                             "train.precision=bf16", "train.eval_every=0", "train.ckpt_every=6",
                             "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    res = train(cfg, progress=False, log=lambda s: None)
    losses = [res.losses[s] for s in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    s = res.summary
    assert (s["attention"], s["remat"]) == ("cudnn", "none")  # the GPU defaults of auto
    assert s["peak_memory_per_device_bytes"] and s["peak_memory_per_device_bytes"] > 0
    print(f"tiny bf16 on {s['device_kind']}: {s['tokens_per_s']:.0f} tokens/s/device, "
          f"step {s['step_time_s'] * 1e3:.1f} ms, peak "
          f"{s['peak_memory_per_device_bytes'] / 2**20:.0f} MiB, compile {s['compile_s']:.1f} s")


@pytest.mark.slow
def test_parity_run_of_tiny_on_gpu(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", "import sys; from parity.cli import main; "
                        "sys.argv[0] = 'parity'; main()", "run", str(TINY), "zero.world_size=1",
                        "--out", str(tmp_path / "report")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])

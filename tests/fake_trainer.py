"""A stand-in trainer that keeps the trainer command-line contract, for testing the
harness's orchestration without jax or torch (fast and deterministic).

``python tests/fake_trainer.py SIDE train CONFIG [k=v ...] [--init-weights F]
[--dump-grads 0] [--dump-params 0] [--no-resume]`` writes ``metrics.jsonl`` (real batch
fingerprints from :mod:`lmspec.data`), the dumps and ``run_summary.json``.

Its numbers are synthetic (throughput: JAX 1000 tokens/s per device, DeepSpeed 800 at
ZeRO 0-1, 700 at ZeRO-2, 600 at ZeRO-3): a loss curve shared by every run plus small,
seeded, per-run deviations sized like real ones (fp32: ~1e-7 relative; bf16: ~1e-3,
with JAX bf16 close to DeepSpeed bf16). ``PARITY_FAKE_FAULT=SIDE:PREC:WHAT`` plants one
fault to prove that the harness catches it; WHAT is ``loss`` (1e-3 relative at step 5),
``grad`` (one parameter's gradient scaled by 1.01), ``fp32`` (a bf16 run with fp32-sized
gradient noise, as if it silently ran in fp32), ``fingerprint`` (step 3's fingerprint
changed), ``crash`` (exit status 3 after two steps) or ``slow`` (sleeps, for timeouts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from lmspec.config import load_config, save_config
from lmspec.io import atomic_write_json
from lmspec.metrics import MetricsWriter
from lmspec.schedule import lr_at
from lmspec.weights import init_weights, load_safetensors, save_safetensors


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(repr(parts).encode())])


def true_grads(w0: dict) -> dict[str, np.ndarray]:
    """The fake's "true" step-0 gradient (float64), shared by every run."""
    return {k: _rng("grad", k).standard_normal(v.shape).astype(np.float64) * 1e-2
            for k, v in sorted(w0.items())}


def base_loss(n: int) -> np.ndarray:
    """The fake's shared loss curve."""
    return 6.2 - 2.0 * (1 - np.exp(-np.arange(n) / 15.0))


def fake_truth(cfg, weights, batch, forward_tokens):  # noqa: ANN001, ANN201 - harness seam
    """The float64 truth of the fake runs (``ParityOptions.truth_fn``)."""
    from parity.truth import Truth

    return Truth(logits=None, loss=float(base_loss(1)[0]), grads=true_grads(weights),
                 tokens=int(batch.shape[0] * (batch.shape[1] - 1)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    side = argv.pop(0)
    p = argparse.ArgumentParser(prog=f"fake-{side}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--init-weights")
    t.add_argument("--dump-grads", default="")
    t.add_argument("--dump-params", default="")
    t.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    prec, stage = cfg.train.precision, cfg.zero.stage if side == "torch" else None
    fault = os.environ.get("PARITY_FAKE_FAULT", "")
    f_side, f_prec, what = (fault.split(":") + ["", "", ""])[:3] if fault else ("", "", "")
    faulty = f_side == side and f_prec == prec
    if faulty and what == "slow":
        time.sleep(3600)

    from lmspec.data import Dataset, batch_fingerprint

    ds = Dataset.from_config(cfg)
    w0 = (load_safetensors(args.init_weights) if args.init_weights
          else init_weights(cfg.model, cfg.train.seed))

    # fp32: a shared "true" gradient plus tiny per-run noise; bf16: larger noise
    true_g = true_grads(w0)
    run_id = (side, prec, stage)
    scale = 1e-7 if prec == "fp32" or (faulty and what == "fp32") else 1e-3
    grads = {k: (g + scale * np.abs(g).mean() * _rng("gnoise", run_id, k)
                 .standard_normal(g.shape)).astype(np.float32) for k, g in true_g.items()}
    if faulty and what == "grad":
        name = sorted(grads)[0]
        grads[name] = grads[name] * np.float32(1.01)
    # the first update: exact AdamW of this run's gradient, with its side's clipping
    from parity.compare import adamw_first_update

    clip_eps = 0.0 if side == "jax" else 1e-6
    params = {k: (w0[k] + adamw_first_update(grads, w0, cfg.optim, k, clip_eps)
                  ).astype(np.float32) for k in w0}
    dumps = out / "dumps"
    if "0" in args.dump_grads.split(","):
        save_safetensors(grads, dumps / "grads_step0.safetensors")
    if "0" in args.dump_params.split(","):
        save_safetensors(params, dumps / "params_step0.safetensors")

    # loss: shared curve + run noise. JAX bf16 follows DeepSpeed bf16 closely (a
    # faithful port), DeepSpeed bf16 departs from fp32 by bf16-sized noise
    n = cfg.train.steps
    base = base_loss(n)
    fp32_noise = 1e-7 * _rng("loss32", side, stage).standard_normal(n)
    bf16_dev = 3e-3 * _rng("loss16").standard_normal(n)
    port_dev = 1e-4 * _rng("port16", side, stage).standard_normal(n)
    loss = base * (1 + fp32_noise) if prec == "fp32" else base * (1 + bf16_dev + port_dev)
    if faulty and what == "loss":
        loss[min(5, n - 1)] *= 1 + 1e-3
    with MetricsWriter(out / "metrics.jsonl") as mw:
        for s in range(n):
            fp = batch_fingerprint(ds.global_batch(s))
            if faulty and what == "fingerprint" and s == 3:
                fp = "0" * 16
            if faulty and what == "crash" and s == 2:
                print("fake trainer: planted crash", file=sys.stderr)
                return 3
            mw.write({"step": s, "loss": float(loss[s]), "grad_norm": 1.0 + 0.01 * s,
                      "lr": lr_at(s, cfg.optim), "tokens_per_s": 1000.0, "mfu": None,
                      "batch_fingerprint": fp, "wall_time": time.time()})
    summary = {"side": side, "precision": prec, "steps": n, "num_devices": 2,
               "device_kind": "cpu", "tokens_per_s": 1000.0 if side == "jax" else 800.0,
               "tokens_per_s_total": 2000.0 if side == "jax" else 1600.0,
               "step_time_s": 0.5, "mfu": None, "peak_memory_bytes": 300 << 20,
               "versions": {"fake": "1"}}
    summary["compile_s" if side == "jax" else "startup_s"] = 1.0
    if side == "torch":  # what torchlm reports; ZeRO-2 700 and ZeRO-3 600 tokens/s
        tps = 800.0 - 100.0 * max(0, stage - 1)
        summary.update({"zero_stage": stage, "zero_profile": cfg.zero.profile,
                        "tokens_per_s": tps, "tokens_per_s_total": 2 * tps})
    atomic_write_json(out / "run_summary.json", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

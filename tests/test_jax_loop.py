"""The JAX training loop built for speed, on 8 virtual CPU devices: records one step late
but complete, prefetch and pipelining change nothing, batch identity from the rows fed
(a planted row offset changes the fingerprint and names its part), ``auto`` attention and
remat resolution, the shared ``lmspec.runs`` pieces.

Planted faults live here, patched in from the test (``monkeypatch``) or put on the
trainer subprocess's path (``tests/overlay_row_offset/sitecustomize.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jaxlm import batches as fb  # noqa: E402
from jaxlm import trainer, tuning  # noqa: E402
from jaxlm.recorder import Recorder, _Pending  # noqa: E402
from lmspec import runs  # noqa: E402
from lmspec.config import load_config  # noqa: E402
from lmspec.data import batch_fingerprint, fingerprint_parts, row_digests  # noqa: E402
from lmspec.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # 4 data-parallel ranks
QUIET = ["train.eval_every=0", "train.log_every=1000", "train.precision=fp32",
         "train.micro_batch_size=1"]


def _cfg(out: Path, *overrides: str):
    return load_config(TINY, [f"train.out_dir={out}", *QUIET, *MESH, *overrides])


@pytest.fixture(scope="module")
def dataset():
    from lmspec.data import Dataset

    return Dataset.from_config(load_config(TINY), progress=False)


# ----------------------------------------------------------------------------- pipelining


def _pipelined_run(out: Path, dataset, monkeypatch, steps: int):
    """A run logging the order in which steps are dispatched and their metrics read."""
    events: list[tuple[str, int]] = []
    dispatch = trainer._dispatch
    write = Recorder._write

    def logged_dispatch(program, state, batch):
        events.append(("dispatch", batch.step))
        return dispatch(program, state, batch)

    def logged_write(self, p):
        events.append(("read", p.step))
        return write(self, p)

    with monkeypatch.context() as m:
        m.setattr(trainer, "_dispatch", logged_dispatch)
        m.setattr(Recorder, "_write", logged_write)
        res = trainer.train(_cfg(out, f"train.steps={steps}", "train.ckpt_every=0"),
                            progress=False, dataset=dataset, log=lambda s: None)
    return res, events


def test_metrics_read_one_step_late_and_every_step_written(tmp_path, dataset, monkeypatch):
    """Step n's metrics are read only after step n+1 was dispatched; every step, the
    last included, gets its record, with lmspec's fingerprints of its global batch."""
    steps = 4
    _, events = _pipelined_run(tmp_path / "piped", dataset, monkeypatch, steps)
    expect = [("dispatch", 0), ("dispatch", 1), ("read", 0), ("dispatch", 2), ("read", 1),
              ("dispatch", 3), ("read", 2), ("read", 3)]
    assert events == expect
    recs = read_metrics(tmp_path / "piped" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(steps))
    for r in recs:
        assert r["tokens_per_s"] > 0
        rows = dataset.global_batch(r["step"])
        assert r["batch_fingerprint"] == batch_fingerprint(rows)
        assert r["batch_fingerprint_parts"] == fingerprint_parts(row_digests(rows), 1)


@pytest.mark.slow
def test_pipelining_changes_no_number(tmp_path, dataset, monkeypatch):
    """The pipelined run logs bitwise the losses, norms and fingerprints of a run with
    nothing overlapped (each batch complete on the devices before its step, each record
    written before the next step is dispatched)."""
    steps = 4
    piped, _ = _pipelined_run(tmp_path / "piped", dataset, monkeypatch, steps)
    put = fb.Batches.train

    def put_and_wait(self, step):
        got = put(self, step)
        jax.block_until_ready(got.array)
        return got

    def add_and_write(self, step, metrics, batch, dispatched):
        Recorder.flush(self)
        self.pending.append(_Pending(step, metrics, batch, dispatched))
        Recorder.flush(self)

    monkeypatch.setattr(fb.Batches, "train", put_and_wait)
    monkeypatch.setattr(Recorder, "add", add_and_write)
    plain = trainer.train(_cfg(tmp_path / "plain", f"train.steps={steps}", "train.ckpt_every=0"),
                          progress=False, dataset=dataset, log=lambda s: None)
    assert plain.losses == piped.losses  # bitwise
    recs = read_metrics(tmp_path / "piped" / "metrics.jsonl")
    plain_recs = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    for a, b in zip(recs, plain_recs, strict=True):
        for k in ("loss", "grad_norm", "lr", "batch_fingerprint", "batch_fingerprint_parts"):
            assert a[k] == b[k], (a["step"], k)


def test_async_save_holds_the_state_of_its_step(tmp_path, dataset):
    """The checkpoint saved in the background after step 2 holds the params of that step
    (dumped synchronously), although later steps donate those buffers."""
    from jaxlm.checkpoint import Checkpoints

    out = tmp_path / "run"
    cfg = _cfg(out, "train.steps=4", "train.ckpt_every=2", "train.ckpt_keep=3")
    trainer.train(cfg, dump_params=[1], progress=False, dataset=dataset, log=lambda s: None)
    setup = trainer.build_setup(cfg)
    ckpts = Checkpoints(out, keep=3, read_only=True)
    try:
        assert ckpts.all_steps() == [2, 4]
        state, meta = ckpts.restore(2, setup.abstract_state)
    finally:
        ckpts.close()
    assert meta["step"] == 2
    from jaxlm.weights import params_to_hf
    from lmspec.weights import load_safetensors

    saved = params_to_hf(trainer.to_host(state["params"]), cfg.model, cfg.train.scan_layers)
    dumped = load_safetensors(out / "dumps" / "params_step1.safetensors")
    assert set(saved) == set(dumped)
    assert all(np.array_equal(saved[k], dumped[k]) for k in saved)


# ----------------------------------------------------------------------------- batch identity


def test_fingerprint_is_of_the_rows_fed(tmp_path, dataset, monkeypatch):
    """A row offset planted in the rows of one data-parallel rank at one micro-step changes
    the logged fingerprint and exactly the part of that micro-step and rank (unchanged
    code logs lmspec's fingerprints: the test above and test_jax_train's contract test)."""
    # global batch 8 = 2 micro-steps x 4 ranks x 1 row: rank 2 of micro-step 1 is row 6
    planted_row, part = 6, 6
    rows_fn = fb.Batches.rows

    def shifted(self, step, start, stop):
        if start == planted_row and step == 1:
            return rows_fn(self, step, start + 1, stop + 1)
        return rows_fn(self, step, start, stop)

    monkeypatch.setattr(fb.Batches, "rows", shifted)
    trainer.train(_cfg(tmp_path, "train.steps=2"), progress=False, dataset=dataset,
                  log=lambda s: None)
    bad = read_metrics(tmp_path / "metrics.jsonl")
    assert bad[0]["batch_fingerprint"] == batch_fingerprint(dataset.global_batch(0))
    rows = dataset.global_batch(1)
    assert bad[1]["batch_fingerprint"] != batch_fingerprint(rows)
    want = fingerprint_parts(row_digests(rows), 1)
    differ = [i for i, (a, b) in enumerate(zip(bad[1]["batch_fingerprint_parts"], want,
                                               strict=True)) if a != b]
    assert differ == [part]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_row_offset_in_one_process_is_caught(tmp_path, dataset):
    """Two processes x 4 devices; process 1 reads one row wrong (overlay on its path). The
    fingerprint process 0 logs combines both processes' digests, so it differs from
    lmspec's, in the part of that micro-step and rank only."""
    overlay = ROOT / "tests" / "overlay_row_offset"
    procs = []
    port = _free_port()
    for pid in range(2):
        env = dict(os.environ)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        path = [str(overlay)] if pid == 1 else []
        env["PYTHONPATH"] = os.pathsep.join([*path, str(ROOT), env.get("PYTHONPATH", "")])
        env.update(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2",
                   JAXLM_PROCESS_ID=str(pid), JAXLM_TEST_ROW_OFFSET="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", "train", str(TINY), "train.steps=2",
             f"train.out_dir={tmp_path / 'mp'}", *QUIET, *MESH, "--no-progress"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    import re

    planted = re.findall(r"planted row offset: step 1 row (\d+)", errs[1])
    assert len(planted) == 1 and "planted" not in errs[0]  # in process 1 only
    row = int(planted[0])  # one row per rank and micro-step: part index == global row
    recs = read_metrics(tmp_path / "mp" / "metrics.jsonl")
    assert recs[0]["batch_fingerprint"] == batch_fingerprint(dataset.global_batch(0))
    rows = dataset.global_batch(1)
    assert recs[1]["batch_fingerprint"] != batch_fingerprint(rows)
    want = fingerprint_parts(row_digests(rows), 1)
    differ = [i for i, (a, b) in enumerate(zip(recs[1]["batch_fingerprint_parts"], want,
                                               strict=True)) if a != b]
    assert differ == [row]


# ----------------------------------------------------------------------------- auto settings


def _dev(platform: str, cc: str | None = None):
    return SimpleNamespace(platform=platform, compute_capability=cc, process_index=0,
                           memory_stats=lambda: None)


@pytest.mark.parametrize("precision, platform, cc, head_dim, want", [
    ("bf16", "gpu", "9.0", 64, "cudnn"),
    ("bf16", "gpu", "8.0", 128, "cudnn"),
    ("bf16", "gpu", "8.0", 160, "xla"),  # > 128 before Hopper
    ("bf16", "gpu", "9.0", 160, "cudnn"),
    ("bf16", "gpu", "9.0", 36, "xla"),  # not a multiple of 8
    ("bf16", "gpu", "7.5", 64, "xla"),  # pre-Ampere
    ("fp32", "gpu", "9.0", 64, "xla"),  # no fp32 flash kernel
    ("bf16", "cpu", None, 64, "xla"),
])
def test_auto_attention(precision, platform, cc, head_dim, want) -> None:
    model = load_config(TINY, [f"model.hidden_size={head_dim * 8}",
                               "model.num_attention_heads=8"]).model
    assert model.head_dim == head_dim
    assert tuning.resolve_attention("auto", model, precision, [_dev(platform, cc)]) == want
    for explicit in ("xla", "cudnn"):
        assert tuning.resolve_attention(explicit, model, precision, [_dev(platform, cc)]) \
            == explicit


def test_auto_remat_by_size_and_memory() -> None:
    gib = 2**30
    tiny = load_config(TINY, ["train.precision=bf16"])
    b1 = load_config(ROOT / "configs" / "llama-1b.yaml")
    b7 = load_config(ROOT / "configs" / "llama-7b.yaml")

    def pick(cfg, mem, rows=1, attention="cudnn"):
        return tuning.resolve_remat("auto", cfg, rows_per_device=rows, param_shards=1,
                                    attention=attention, device_bytes=mem)

    assert pick(tiny, 8 * gib, attention="xla") == "none"
    assert pick(b1, 80 * gib) == "none"  # ~24 GiB state + ~4 GiB activations
    assert pick(b7, 80 * gib) == "full"  # the state alone does not fit
    # larger micro-batches on the same device: never less recomputation
    order = {p: i for i, p in enumerate(tuning.REMAT_ORDER)}
    picks = [pick(b1, 80 * gib, rows) for rows in (1, 2, 4, 8, 16, 32, 64)]
    assert [order[p] for p in picks] == sorted(order[p] for p in picks)
    assert set(picks) == {"none", "dots_saveable", "full"}
    for explicit in ("none", "full", "dots_saveable"):
        assert tuning.resolve_remat(explicit, b7, rows_per_device=64, param_shards=1,
                                    attention="xla", device_bytes=gib) == explicit
    # the estimate orders the policies as their definitions do
    est = {p: tuning.activation_bytes(b1.model, 1, 2048, "bf16", "cudnn", p)
           for p in tuning.REMAT_ORDER}
    assert est["none"] > est["dots_saveable"] > est["full"]


def test_gpu_compile_options_only_on_gpu() -> None:
    assert tuning.compiler_options("cpu") == {}
    assert tuning.compiler_options("gpu")["xla_gpu_enable_latency_hiding_scheduler"] is True
    # every option is a field XLA knows (an unknown one is an error at compile time)
    lowered = jax.jit(lambda x: x * 2).lower(jax.numpy.ones(3))
    lowered.compile(tuning.compiler_options("gpu"))
    with pytest.raises(Exception, match="No such compile option"):
        lowered.compile({"xla_gpu_no_such_option": True})


def test_explicit_settings_kept_and_cudnn_refused_on_cpu(tmp_path) -> None:
    setup = trainer.build_setup(_cfg(tmp_path, "train.remat=dots_saveable",
                                     "train.attention=xla"))
    assert (setup.cfg.train.remat, setup.cfg.train.attention) == ("dots_saveable", "xla")
    auto = trainer.build_setup(_cfg(tmp_path, "train.remat=auto", "train.attention=auto"))
    assert (auto.cfg.train.remat, auto.cfg.train.attention) == ("none", "xla")
    from lmspec.config import ConfigError

    with pytest.raises(ConfigError, match="train.attention='cudnn' needs NVIDIA GPUs"):
        trainer.build_setup(_cfg(tmp_path, "train.attention=cudnn"))


# ----------------------------------------------------------------------------- lmspec.runs


def test_runs_flags_summary_and_versions(tmp_path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    runs.add_train_args(parser)
    cfg = load_config(TINY, ["train.steps=5"])
    args = parser.parse_args([str(TINY), "train.steps=5", "--dump-grads", "3,0,3",
                              "--no-resume", "--no-progress"])
    got = runs.train_args(args, cfg)
    assert got == runs.TrainArgs(dump_grads=(0, 3), resume=False, progress=False)
    with pytest.raises(ValueError, match=r"--dump-params: steps \[5\] are outside"):
        runs.train_args(parser.parse_args([str(TINY), "--dump-params", "5"]), cfg)
    with pytest.raises(ValueError, match="--dump-grads='1,x': expected comma-separated"):
        runs.parse_steps("1,x", "--dump-grads")

    s = runs.run_summary(side="jax", cfg=cfg, step_times=[9.0, 9.0, 1.0, 3.0], start_step=0,
                         num_devices=2, num_processes=1, device_kind="cpu",
                         num_micro_batches=4, peak_memory_bytes=5,
                         peak_memory_per_device_bytes=None, startup_s=1.5, final_loss=2.0,
                         versions={"python": "3"}, compile_s=4.0)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    # warm-up steps (2 in tiny) are left out: 2 steps' tokens over their 4 s, per device
    # (not the mean of per-step rates, (t/1 + t/3) / 2, which the short step inflates)
    assert s["tokens_per_s"] == pytest.approx(2 * tokens / 4.0 / 2)
    assert s["step_time_s"] == 2.0 and s["compile_s"] == 4.0 and s["mfu"] is None
    path = runs.write_run_summary(tmp_path, s)
    assert json.loads(path.read_text())["tokens_per_s_total"] == pytest.approx(
        2 * s["tokens_per_s"])
    with pytest.raises(ValueError, match="run summary lacks fields"):
        runs.write_run_summary(tmp_path, {"side": "jax"})
    v = runs.versions("numpy", "no-such-distribution-xyz")
    assert v["numpy"] == np.__version__ and v["no-such-distribution-xyz"] == "not installed"
    out = subprocess.run([sys.executable, "-c", "import sys, lmspec.runs; "
                          "print('jax' in sys.modules, 'torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "False"], out.stderr

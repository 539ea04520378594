"""jaxlm trainer on 8 virtual CPU devices: sharding invariance, resume exactness,
kill-during-save, dumps vs the single-device API, learning, multi-process, CLI errors.

Tolerances are the constants below, fixed in one place.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jaxlm import api  # noqa: E402
from jaxlm.trainer import train  # noqa: E402
from lmspec.config import load_config  # noqa: E402
from lmspec.data import batch_fingerprint  # noqa: E402
from lmspec.metrics import REQUIRED_FIELDS, read_metrics  # noqa: E402
from lmspec.weights import init_weights, load_safetensors, save_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
INVARIANCE_RTOL = 1e-5  # max per-step relative loss difference across meshes (fp32)
MULTIPROCESS_RTOL = 1e-5  # 2 processes x 4 devices vs 1 process x 8 devices
GRAD_RTOL = 1e-5  # sharded trainer grads vs single-device API, relative L2 per tensor
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)]
QUIET = ["train.eval_every=0", "train.log_every=1000"]


def _cfg(tmp: Path, *overrides: str):
    return load_config(TINY, [f"train.out_dir={tmp}", *QUIET, *overrides])


def _mesh(m: tuple[int, int, int]) -> list[str]:
    return [f"mesh.data={m[0]}", f"mesh.fsdp={m[1]}", f"mesh.tensor={m[2]}"]


@pytest.fixture(scope="module")
def dataset():
    from lmspec.data import Dataset

    return Dataset.from_config(load_config(TINY), progress=False)


REF_STEPS = 6
REF_MESH = (2, 2, 2)
REF_COMMON = ["train.precision=fp32", "train.micro_batch_size=1", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, dataset):
    """One uninterrupted fp32 run of tiny on mesh (2, 2, 2): 6 steps, checkpoints at 3
    and 6, params dumped after step 5. Shared by the invariance, resume, kill and
    multi-process tests so each needs one training run fewer."""
    out = tmp_path_factory.mktemp("ref")
    cfg = _cfg(out, f"train.steps={REF_STEPS}", *REF_COMMON, *_mesh(REF_MESH))
    res = train(cfg, dump_params=[REF_STEPS - 1], progress=False, dataset=dataset,
                log=lambda s: None)
    return res, out


def _env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LMSPEC_TRACEBACK", None)
    return env


def _jaxlm(*args: str, devices: int = 8, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout, **kw)


# ----------------------------------------------------------------------------- invariance


def _invariance(tmp_path: Path, dataset, steps: int, ref_run=None) -> float:
    runs = {}
    for m in MESHES:
        if ref_run is not None and m == REF_MESH and steps == REF_STEPS:
            res, out = ref_run
        else:
            out = tmp_path / "x".join(map(str, m))
            cfg = _cfg(out, f"train.steps={steps}", "train.micro_batch_size=1",
                       "train.precision=fp32", *_mesh(m))
            res = train(cfg, progress=False, dataset=dataset, log=lambda s: None)
        runs[m] = np.array([res.losses[s] for s in range(steps)])
        runs[(m, "fp")] = [r["batch_fingerprint"] for r in read_metrics(out / "metrics.jsonl")]
    ref = runs[MESHES[0]]
    worst = 0.0
    for m in MESHES[1:]:
        assert runs[(m, "fp")] == runs[(MESHES[0], "fp")], m  # same batches everywhere
        rel = np.abs(runs[m] - ref) / np.abs(ref)
        worst = max(worst, float(rel.max()))
    assert ref[-1] < ref[0]  # it trained
    print(f"sharding invariance over {steps} steps: max relative loss difference {worst:.2e}")
    return worst


def test_sharding_invariance_short(tmp_path: Path, dataset, ref_run) -> None:
    assert _invariance(tmp_path, dataset, REF_STEPS, ref_run) <= INVARIANCE_RTOL


@pytest.mark.slow
def test_sharding_invariance_20_steps(tmp_path: Path, dataset) -> None:
    assert _invariance(tmp_path, dataset, steps=20) <= INVARIANCE_RTOL


# ----------------------------------------------------------------------------- resume


# bf16 is slow-marked (~40 s on 2 cores) to keep the default suite under 15 min in CI
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_resume_is_bitwise(tmp_path: Path, dataset, ref_run, precision: str) -> None:
    common = [*REF_COMMON[1:], f"train.precision={precision}", *_mesh(REF_MESH)]
    if precision == "fp32":
        full, full_dir = ref_run
    else:
        full_dir = tmp_path / "full"
        full = train(_cfg(full_dir, f"train.steps={REF_STEPS}", *common),
                     dump_params=[REF_STEPS - 1], progress=False, dataset=dataset,
                     log=lambda s: None)
    part = _cfg(tmp_path / "part", "train.steps=3", *common)
    first = train(part, progress=False, dataset=dataset, log=lambda s: None)
    assert first.summary["start_step"] == 0
    rest = train(_cfg(tmp_path / "part", f"train.steps={REF_STEPS}", *common),
                 dump_params=[REF_STEPS - 1], progress=False, dataset=dataset,
                 log=lambda s: None)
    assert rest.summary["start_step"] == 3
    assert sorted(rest.losses) == [3, 4, 5]
    for s in range(REF_STEPS):
        got = first.losses[s] if s < 3 else rest.losses[s]
        assert got == full.losses[s], (s, got, full.losses[s])  # bitwise
    name = f"params_step{REF_STEPS - 1}.safetensors"
    a = load_safetensors(full_dir / "dumps" / name)
    b = load_safetensors(tmp_path / "part" / "dumps" / name)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    recs = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(REF_STEPS))


def test_kill_during_save_resumes_from_last_complete(tmp_path: Path, dataset, ref_run) -> None:
    out = tmp_path / "killed"
    args = ["train", str(TINY), f"train.out_dir={out}", "train.steps=40", "train.ckpt_every=1",
            "train.ckpt_keep=2", *QUIET, *_mesh(REF_MESH), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = out / "checkpoints"
    partial = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckdir.is_dir():
                done = [p for p in ckdir.iterdir() if p.name.isdigit()]
                tmp = [p for p in ckdir.iterdir() if "tmp" in p.name]
                if tmp and done:  # a save is in progress and an earlier one completed
                    proc.send_signal(signal.SIGKILL)
                    partial = tmp[0]
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and partial is None:
            proc.kill()
        proc.wait()
    assert partial is not None, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists()  # killed while that checkpoint was being written
    complete = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert complete, "no complete checkpoint before the kill"
    # same program as the reference run (ckpt_every does not change the maths)
    steps = max(REF_STEPS, complete[-1] + 2)
    resumed = train(_cfg(out, f"train.steps={steps}", *_mesh(REF_MESH)), progress=False,
                    dataset=dataset, log=lambda s: None)
    assert resumed.summary["start_step"] == complete[-1]
    assert not partial.exists()  # the incomplete save was cleaned up
    last = max(resumed.losses)
    if steps == REF_STEPS:
        ref = ref_run[0]
    else:  # the kill came late: an own uninterrupted reference
        ref = train(_cfg(tmp_path / "ref", f"train.steps={steps}", *_mesh(REF_MESH)),
                    progress=False, dataset=dataset, log=lambda s: None)
    for s, v in resumed.losses.items():
        assert v == ref.losses[s], s  # bitwise
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(last + 1))


# ----------------------------------------------------------------------------- contract


def test_cli_run_contract_dumps_and_grads_match_api(tmp_path: Path, dataset) -> None:
    cfg = load_config(TINY)
    w = init_weights(cfg.model, 3)
    wfile = tmp_path / "init.safetensors"
    save_safetensors(w, wfile)
    out = tmp_path / "run"
    r = _jaxlm("train", str(TINY), f"train.out_dir={out}", "train.steps=3", *_mesh((2, 2, 2)),
               "train.eval_every=2", "train.eval_batches=1", "--init-weights", str(wfile),
               "--dump-grads", "0,2", "--dump-params", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in recs] == [0, 1, 2]
    for rec in recs:
        assert set(REQUIRED_FIELDS) <= set(rec)
        assert rec["mfu"] is None and rec["tokens_per_s"] > 0
    assert "val_loss" in recs[1] and "val_loss" not in recs[0]
    from lmspec.data import fingerprint_parts, row_digests
    from lmspec.schedule import lr_at

    for s, rec in enumerate(recs):
        rows = dataset.global_batch(s)
        assert rec["batch_fingerprint"] == batch_fingerprint(rows)
        assert rec["batch_fingerprint_parts"] == fingerprint_parts(row_digests(rows), 1)
        assert rec["lr"] == pytest.approx(lr_at(s, cfg.optim), rel=1e-7)
    summary = json.loads((out / "run_summary.json").read_text())
    from lmspec.runs import SUMMARY_FIELDS

    for k in (*SUMMARY_FIELDS, "compile_s", "attention", "remat", "compiled_memory"):
        assert k in summary, k
    assert summary["side"] == "jax" and summary["num_devices"] == 8
    assert (summary["attention"], summary["remat"]) == ("xla", "none")  # auto on CPU
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "3").is_dir()
    assert any((out / "tb").iterdir())
    # step-0 gradient of the sharded, accumulated trainer == single-device API
    loss0, g_api = api.loss_and_grads(cfg, w, dataset.global_batch(0), "fp32")
    assert recs[0]["loss"] == pytest.approx(loss0, rel=1e-6)
    g0 = load_safetensors(out / "dumps" / "grads_step0.safetensors")
    assert set(g0) == set(w)
    for k in g0:
        err = np.linalg.norm(g0[k] - g_api[k]) / np.linalg.norm(g_api[k])
        assert err <= GRAD_RTOL, (k, err)
    gnorm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in g0.values()))
    assert recs[0]["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
    p0 = load_safetensors(out / "dumps" / "params_step0.safetensors")
    assert set(p0) == set(w) and not np.array_equal(p0["lm_head.weight"], w["lm_head.weight"])
    assert (out / "dumps" / "grads_step2.safetensors").is_file()
    # generate from the run: greedy is deterministic
    g1 = _jaxlm("generate", str(out), "--prompt", "def ", "--max-new-tokens", "8")
    g2 = _jaxlm("generate", str(out / "checkpoints" / "3"), "--prompt", "def ",
                "--max-new-tokens", "8")
    assert g1.returncode == 0, g1.stderr[-2000:]
    assert g1.stdout == g2.stdout and g1.stdout.startswith("def ")


@pytest.mark.parametrize("args, message", [
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"], "= 4 but 8 devices are available"),
    (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"], "parameter 'layers.attn.k_dkq'"),
    (["--dump-grads", "0,x"], "--dump-grads='0,x': expected comma-separated step numbers"),
    (["--dump-params", "7"], "--dump-params: steps [7] are outside [0, train.steps=3)"),
    (["--init-weights", "/nonexistent.safetensors"], "weights file not found"),
    (["train.remat=some"], "train.remat='some': allowed are"),
    (["distributed.num_processes=2"], "needs distributed.coordinator_address"),
    (["train.attention=cudnn"], "train.attention='cudnn' needs NVIDIA GPUs"),
])
def test_cli_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = _jaxlm("train", str(TINY), f"train.out_dir={tmp_path}", "train.steps=3", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr[-2000:]


def test_init_weights_strict(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    w = init_weights(cfg.model, 0)
    del w["model.norm.weight"]
    save_safetensors(w, tmp_path / "w.safetensors")
    r = _jaxlm("train", str(TINY), f"train.out_dir={tmp_path}", "train.steps=2",
               "--init-weights", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and "missing keys ['model.norm.weight']" in r.stderr


def test_generate_errors(tmp_path: Path) -> None:
    r = _jaxlm("generate", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "error: " in r.stderr
    (tmp_path / "checkpoints").mkdir()
    r = _jaxlm("generate", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


def test_distributed_resolve_errors() -> None:
    from jaxlm.distributed import resolve
    from lmspec.config import ConfigError, DistributedConfig

    assert resolve(DistributedConfig(), env={}) is None
    spec = resolve(DistributedConfig(), env={"JAXLM_NUM_PROCESSES": "2",
                                             "JAXLM_COORDINATOR": "h:1", "JAXLM_PROCESS_ID": "1"})
    assert spec == ("h:1", 2, 1)
    with pytest.raises(ConfigError, match="JAXLM_PROCESS_ID"):
        resolve(DistributedConfig(num_processes=2, coordinator_address="h:1"), env={})
    with pytest.raises(ConfigError, match="JAXLM_NUM_PROCESSES='two'"):
        resolve(DistributedConfig(), env={"JAXLM_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match=r"process id 3 must be in \[0, 2\)"):
        resolve(DistributedConfig(), env={"JAXLM_NUM_PROCESSES": "2",
                                          "JAXLM_COORDINATOR": "h:1", "JAXLM_PROCESS_ID": "3"})


# ----------------------------------------------------------------------------- learning


def _learning(tmp_path: Path, dataset, steps: int) -> tuple[float, float]:
    cfg = _cfg(tmp_path, f"train.steps={steps}", *_mesh((2, 2, 2)))
    res = train(cfg, progress=False, dataset=dataset, log=lambda s: None)
    first, best = res.losses[0], min(res.losses.values())
    print(f"learning: step-0 loss {first:.3f}, best within {steps} steps {best:.3f}")
    return first, best


@pytest.mark.slow  # ~27 s on 2 cores; test_learning_200_steps is the longer one
def test_learning_within_30_steps(tmp_path: Path, dataset) -> None:
    first, best = _learning(tmp_path, dataset, 30)
    assert best <= 0.7 * first


@pytest.mark.slow
def test_learning_200_steps(tmp_path: Path, dataset) -> None:
    first, best = _learning(tmp_path, dataset, 200)
    assert best <= 0.7 * first


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~27 s on 2 cores (two jax.distributed processes)
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path: Path, dataset, ref_run) -> None:
    steps = REF_STEPS  # compared with the 1-process 8-device reference run
    common = [f"train.steps={steps}", *QUIET, *REF_COMMON, *_mesh(REF_MESH), "--no-progress"]
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(devices=4)
        env.update(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2",
                   JAXLM_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", "train", str(TINY),
             f"train.out_dir={tmp_path / 'mp'}", *common],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    mp = read_metrics(tmp_path / "mp" / "metrics.jsonl")
    summary = json.loads((tmp_path / "mp" / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_devices"] == 8
    one = ref_run[0]
    assert [r["step"] for r in mp] == list(range(steps))
    for r in mp:
        ref = one.losses[r["step"]]
        assert abs(r["loss"] - ref) <= MULTIPROCESS_RTOL * abs(ref), (r["step"], r["loss"], ref)
        assert r["batch_fingerprint"] == batch_fingerprint(dataset.global_batch(r["step"]))
    assert (tmp_path / "mp" / "checkpoints" / str(steps)).is_dir()


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path: Path, dataset, ref_run) -> None:
    """A run dir holding checkpoints of another model or layer layout: a clear error naming
    the keys, exit 2, and the earlier run's config.yaml left as it was."""
    import shutil

    _, ref_out = ref_run
    out = tmp_path / "other"
    shutil.copytree(ref_out, out)
    before = (out / "config.yaml").read_bytes()
    proc = _jaxlm("train", str(TINY), f"train.out_dir={out}", "model.num_hidden_layers=2",
                  "train.steps=8", *QUIET, *_mesh(REF_MESH), "--no-progress")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.num_hidden_layers: checkpoint 4, config 2" in proc.stderr
    assert "--no-resume" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="train.scan_layers: checkpoint True, config False"):
        train(_cfg(out, "train.steps=8", "train.scan_layers=false", *_mesh(REF_MESH)),
              progress=False, dataset=dataset, log=lambda s: None)
    assert (out / "config.yaml").read_bytes() == before

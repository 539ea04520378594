"""Orchestration of ``parity run`` with a stand-in trainer (tests/fake_trainer.py) that keeps
the trainer command-line contract: planned runs, subprocess handling, every check, the
reports, and that a planted fault fails its check and the exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from parity import run as P
from parity.run_cmd import finish

ROOT = Path(__file__).resolve().parents[1]


def fake_cmd(side: str) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("fake_trainer.py")), side]


def fake_truth(*args):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from fake_trainer import fake_truth as f
    finally:
        sys.path.pop(0)
    return f(*args)


@pytest.fixture
def cfg(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"data.source=text:{text}", f"data.cache_dir={tmp_path / 'cache'}",
                        "data.seq_len=32", "data.val_fraction=0.05"])


def opts(tmp_path, **kw):
    base = dict(out=tmp_path / "out", forward=False, trainer_cmd=fake_cmd, truth_fn=fake_truth,
                zero_stages=(1, 3), precisions=("fp32", "bf16"), run_timeout_s=120)
    base.update(kw)
    return P.ParityOptions(**base)


def test_plan_runs_default_and_floor_stages(tmp_path):
    runs = P.plan_runs(tmp_path, (1, 2, 3), ("fp32", "bf16"), 20, 50)
    got = {(r.label, r.steps) for r in runs}
    assert got == {("jax fp32", 20), ("jax bf16", 50),
                   ("ds zero1 fp32", 20), ("ds zero2 fp32", 20), ("ds zero3 fp32", 20),
                   ("ds zero1 bf16", 50), ("ds zero2 bf16", 50), ("ds zero3 bf16", 50)}
    only32 = P.plan_runs(tmp_path, (1, 3), ("fp32",), 20, 50)
    assert {(r.label, r.steps) for r in only32} == {("jax fp32", 20), ("ds zero1 fp32", 20),
                                                     ("ds zero3 fp32", 20)}
    # one stage asked: a second one runs for the stage-to-stage noise floor
    only16 = P.plan_runs(tmp_path, (2,), ("bf16",), 20, 50)
    assert {(r.label, r.steps) for r in only16} == {("jax bf16", 50), ("ds zero2 bf16", 50),
                                                     ("ds zero1 bf16", 50)}
    assert P.floor_stages((1,)) == (1, 2) and P.floor_stages((3,)) == (3, 1)
    assert len({r.out_dir for r in runs}) == len(runs)


def test_trainer_args_follow_the_contract(tmp_path):
    spec = P.RunSpec("ds zero3 bf16", "torch", "bf16", 3, 50, tmp_path / "r")
    args = P.trainer_args(spec, tmp_path / "c.yaml", tmp_path / "w.safetensors")
    assert args[:2] == ["train", str(tmp_path / "c.yaml")]
    for a in ("train.steps=50", "train.precision=bf16", f"train.out_dir={tmp_path / 'r'}",
              "zero.stage=3", "--no-resume"):
        assert a in args
    i = args.index("--init-weights")
    assert args[i + 1] == str(tmp_path / "w.safetensors")
    assert args[args.index("--dump-grads") + 1] == "0"
    assert args[args.index("--dump-params") + 1] == "0"


def test_jax_env_sets_exactly_one_device_count():
    env = P.jax_env({"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"}, 2)
    assert env["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=2"]
    assert "XLA_FLAGS" not in P.jax_env({}, None)


def test_validate_options(cfg, tmp_path):
    for kw, msg in ((dict(zero_stages=(4,)), "zero-stages"),
                    (dict(zero_stages=(1, 1)), "repeats"),
                    (dict(precisions=("fp16",)), "precisions"),
                    (dict(steps_bf16=0), "steps-bf16")):
        with pytest.raises(ValueError, match=msg):
            P.validate_options(opts(tmp_path, **kw), cfg)


def test_full_run_with_fake_trainers_passes(cfg, tmp_path, capsys):
    res = P.run_parity(cfg, opts(tmp_path, steps_fp32=20, steps_bf16=50))
    names = {c["name"]: c for c in res["checks"]}
    expected = {
        "fp32 zero1: grad vs float64 (worst tensor)",
        "fp32 zero3: first update vs float64 AdamW (worst tensor)",
        "fp32 zero1: loss curve vs noise (20 steps)",
        "fp32 zero3: batch fingerprint mismatches", "bf16 zero1: loss at step 0 vs float64",
        "bf16 zero3: grad vs float64 (worst tensor)",
        "bf16 zero1: loss curve vs DeepSpeed stage-to-stage (50 steps)",
        "bf16: jax bf16 gradient as far from float64 as DeepSpeed bf16's (really bf16)",
        "bf16 zero3: batch fingerprint mismatches",
        "jax fp32 vs jax bf16: batch fingerprint mismatches",
    }
    assert expected <= set(names), sorted(set(expected) - set(names))
    failed = [c for c in res["checks"] if not c["passed"]]
    assert failed == [] and res["errors"] == []
    for c in res["checks"]:  # every check carries its margin, <= 1 when it passes
        assert 0 <= c["margin"] <= 1, c
    loss1 = names["fp32 zero1: loss curve vs noise (20 steps)"]
    # the fake's fp32 loss noise is ~1e-7 relative of a loss ~6
    assert 0 < loss1["value"] < 5e-6 and 0 < loss1["noise"] < 5e-6
    assert loss1["detail"]["stage_floor_from"] == "ds zero1 vs zero3"
    g = names["fp32 zero1: grad vs float64 (worst tensor)"]
    assert g["noise"] > 0 and g["limit"] >= 4 * g["noise"]
    assert "diagnosis" in res and "headline" not in res["diagnosis"]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert all("margin" in c and "noise" in c for c in report["checks"])
    assert set(report["series"]) == {"jax fp32", "jax bf16", "ds zero1 fp32", "ds zero3 fp32",
                                     "ds zero1 bf16", "ds zero3 bf16"}
    assert len(report["series"]["ds zero1 fp32"]["loss"]) == 20
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4
    assert "| margin |" in (out / "report.md").read_text().splitlines()[4]
    assert finish(res) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    # --reuse-runs judges the same runs again without training: the same verdicts
    again = P.run_parity(cfg, opts(tmp_path, steps_fp32=20, steps_bf16=50, reuse_runs=True,
                                   trainer_cmd=lambda side: ["false"]))
    assert [(c["name"], c["value"]) for c in again["checks"]] == \
        [(c["name"], c["value"]) for c in res["checks"]]


@pytest.mark.parametrize("fault,failing", [
    ("jax:fp32:loss", "fp32 zero1: loss curve vs noise (20 steps)"),
    ("jax:fp32:grad", "fp32 zero1: grad vs float64 (worst tensor)"),
    ("jax:bf16:grad", "bf16 zero1: grad vs float64 (worst tensor)"),
    ("jax:bf16:fp32", "bf16: jax bf16 gradient as far from float64 as DeepSpeed bf16's "
                      "(really bf16)"),
    ("torch:bf16:fingerprint", "bf16 zero1: batch fingerprint mismatches"),
])
def test_planted_fault_fails_its_check_and_the_exit_code(cfg, tmp_path, monkeypatch, fault,
                                                         failing, capsys):
    monkeypatch.setenv("PARITY_FAKE_FAULT", fault)
    res = P.run_parity(cfg, opts(tmp_path, zero_stages=(1,), steps_fp32=20, steps_bf16=12))
    bad = {c["name"]: c for c in res["checks"] if not c["passed"]}
    assert failing in bad, sorted(bad)
    assert float(bad[failing]["margin"]) > 1
    capsys.readouterr()  # the progress lines
    assert finish(res) == 1
    out = capsys.readouterr().out
    assert f"FAILED {failing}" in out
    # the verdict starts with the diagnosis headline, as report.md does
    first = out.strip().splitlines()[0]
    assert first.startswith("DIAGNOSIS ") and res["diagnosis"]["headline"] in first
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith(f"**Diagnosis: {res['diagnosis']['headline']}**")
    assert out.strip().splitlines()[-1].startswith("report: ")


def test_crashed_trainer_is_an_error_and_fails(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_FAKE_FAULT", "torch:fp32:crash")
    res = P.run_parity(cfg, opts(tmp_path, zero_stages=(1,), precisions=("fp32",)))
    assert any("ds zero1 fp32: trainer exited with status 3" in e for e in res["errors"])
    assert any("planted crash" in e for e in res["errors"])  # the log tail is shown
    missing = [c for c in res["checks"] if c["name"].startswith("fp32 zero1")]
    assert missing and all(not c["passed"] and c["value"] == "nan" for c in missing)
    assert finish(res) == 1


def test_timeout_kills_the_trainer(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_FAKE_FAULT", "jax:fp32:slow")
    res = P.run_parity(cfg, opts(tmp_path, zero_stages=(1,), precisions=("fp32",),
                                 run_timeout_s=3))
    assert any("jax fp32: trainer exited with status 124" in e for e in res["errors"])


@pytest.mark.parametrize("body,status", [("return 3", 3), ("raise SystemExit(4)", 4),
                                         ("return 0", 0)])
def test_entry_cmd_propagates_the_exit_status(tmp_path, body, status):
    import os
    import subprocess

    pkg = tmp_path / "zzfakecli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(f"def main():\n    {body}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert subprocess.run(P.entry_cmd("zzfakecli"), env=env).returncode == status


def test_update_diagnosis_names_the_dominant_element(tmp_path):
    """Two faithful AdamW steps from gradients that differ by fp32-sized noise plus one
    near-zero element: the diagnosis must find that element and the faithful optimizers."""
    from lmspec.config import OptimConfig
    from parity import compare as C

    o = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=10, grad_clip=1.0)
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((64, 32)) * 0.02}
    g = rng.standard_normal((64, 32)) * 1e-2
    g[3, 5] = 2e-10  # clipped |g| far below eps: Adam's g/(|g|+eps) is linear in g here
    gj, gd = g * (1 + 1e-7), g.copy()
    gj[3, 5] = 4e-10
    runs = {}
    for side, grads in (("jax", gj), ("torch", gd)):
        spec = P.RunSpec(side, side, "fp32", None, 1, tmp_path)
        upd = C.adamw_first_update({"w": grads}, init, o, "w")
        runs[side] = P.RunData(spec, grads0={"w": grads}, params0={"w": init["w"] + upd})
    info = {i["name"].split("diagnosis, ")[1]: i
            for i in P.update_diagnosis("t", "w", runs["jax"], runs["torch"], init, o)}
    assert info["share of the squared difference in one element"]["element"] == [3, 5]
    assert info["share of the squared difference in one element"]["value"] > 0.99
    assert info["jax update vs exact AdamW of its own gradient"]["value"] < 1e-12
    assert info["update rel err without that element"]["value"] < 1e-5
    assert info["exact AdamW(g_jax) vs AdamW(g_ds)"]["value"] > 1e-4


def test_concurrent_trainers_give_the_same_verdicts_as_one_at_a_time(cfg, tmp_path):
    """--jobs changes when the trainers run, never what they compute or how it is judged;
    the report says that concurrent runs' throughput figures are no speed comparison."""
    runs = {}
    for jobs in (1, 2):
        res = P.run_parity(cfg, opts(tmp_path / f"j{jobs}", zero_stages=(1,),
                                     precisions=("fp32",), steps_fp32=6, jobs=jobs))
        runs[jobs] = res
        assert res["errors"] == [] and res["concurrent_jobs"] == jobs
    assert [(c["name"], c["value"], c["passed"]) for c in runs[1]["checks"]] == \
        [(c["name"], c["value"], c["passed"]) for c in runs[2]["checks"]]
    assert list(runs[1]["runs"]) == list(runs[2]["runs"])  # plan order either way
    md1 = (tmp_path / "j1" / "out" / "report.md").read_text()
    md2 = (tmp_path / "j2" / "out" / "report.md").read_text()
    assert "not a speed comparison" in md2 and "not a speed comparison" not in md1


def test_interrupt_stops_the_background_trainers(cfg, tmp_path, monkeypatch):
    """Ctrl-C while the trainers run alongside the in-process phases: the exception
    propagates within seconds and every started trainer is ended, none left behind."""
    import time

    monkeypatch.setenv("PARITY_FAKE_FAULT", "jax:fp32:slow")

    def interrupted_truth(*args):
        time.sleep(2)  # the trainers have started
        raise KeyboardInterrupt

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        P.run_parity(cfg, opts(tmp_path, zero_stages=(1,), precisions=("fp32",), jobs=2,
                               truth_fn=interrupted_truth))
    assert time.perf_counter() - t0 < 60
    log = (tmp_path / "out" / "runs" / "jax_fp32" / "train.log").read_text()
    assert "stopped (the parity run was interrupted)" in log
    import subprocess
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps  # no trainer of this run is still alive


def test_jobs_must_be_positive(cfg, tmp_path):
    with pytest.raises(P.UserError, match="--jobs=0"):
        P.validate_options(opts(tmp_path, jobs=0), cfg)

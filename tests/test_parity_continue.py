"""``parity continue``: a run's checkpoint continued by both trainers, judged (issue 13).

Fast: the mid-training AdamW truth reduces to the first step's; user errors exit 2.
Slow (DeepSpeed workers, trainers): DeepSpeed ZeRO-1 and ZeRO-3 runs of 10 steps (world
size 2) continued 10 steps by DeepSpeed and by JAX from the converted state; a JAX run
continued by DeepSpeed; a wrong conversion (moments dropped, step counts reset) fails
the update and loss-curve checks; a bf16 DeepSpeed run continued in fp32 and bf16 passes,
and the wrong conversion continued in bf16 alone fails. Source runs are shared per module.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.weights import init_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CACHE = f"data.cache_dir={ROOT / '.cache' / 'lmspec'}"
# world size 2, micro batch 2, global batch 8: 2 accumulation steps per optimizer step
ARGS = ["train.micro_batch_size=2", "zero.world_size=2", "train.eval_every=0",
        "train.ckpt_every=0", CACHE]
SOURCE_STEPS = 10
STEPS = 10


# ----------------------------------------------------------------------------- fast


def test_mid_training_truth_is_first_step_at_zero_state():
    """exact_updates_at with zero moments and counters is exact_updates, bit for bit."""
    from parity.truth import exact_updates, exact_updates_at

    cfg = load_config(TINY, ARGS)
    params = init_weights(cfg.model, 0)
    rng = np.random.default_rng(0)
    grads = {k: rng.standard_normal(v.shape) * 1e-2 for k, v in params.items()}
    zeros = {k: np.zeros(v.shape) for k, v in params.items()}
    for side in ("jax", "torch"):
        a = exact_updates(grads, params, cfg.optim, side)
        b = exact_updates_at(grads, params, zeros, zeros, 0, 0, cfg.optim, side)
        for k in a:
            assert np.array_equal(a[k], b[k]), (side, k)


def _parity(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from parity.cli import main; sys.argv[0] = 'parity'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def test_user_errors_exit_2(tmp_path):
    r = _parity("continue", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such run folder" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()
    r = _parity("continue", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no checkpoints" in r.stderr, r.stderr
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "latest").write_text("step00000001")
    r = _parity("continue", str(tmp_path / "run"), "--steps", "0")
    assert r.returncode == 2 and "--steps=0 must be >= 1" in r.stderr, r.stderr
    r = _parity("continue", str(tmp_path / "run"), "--precisions", "fp32,fp8")
    assert r.returncode == 2 and "--precisions: 'fp8'; allowed" in r.stderr, r.stderr


def test_continued_precisions_and_plan(tmp_path):
    from lmspec.errors import UserError
    from parity.continuation import continuation_plan, continued_precisions

    assert continued_precisions("fp32", None) == ("fp32",)
    assert continued_precisions("bf16", None) == ("fp32", "bf16")
    assert continued_precisions("fp32", ("bf16",)) == ("bf16",)
    for asked, msg in (((), "give at least one"), (("fp16",), "'fp16'; allowed: fp32, bf16"),
                       (("bf16", "bf16"), "repeats a precision")):
        with pytest.raises(UserError, match=msg):
            continued_precisions("bf16", asked)
    plan = continuation_plan(tmp_path, ("fp32", "bf16"), 1, 2, 5)
    assert [(p.label, p.out_dir.name, p.steps) for p in plan] == [
        ("jax fp32", "jax_fp32", 5), ("ds zero1 fp32", "ds_zero1_fp32", 5),
        ("ds zero2 fp32", "ds_zero2_fp32", 5), ("jax bf16", "jax_bf16", 5),
        ("ds zero1 bf16", "ds_zero1_bf16", 5), ("ds zero2 bf16", "ds_zero2_bf16", 5)]


def test_how_each_continuation_got_its_state(tmp_path, monkeypatch):
    """_prepare's account of each run (the report's setup names it): copied, re-written
    or converted, with what it wrote where (the writers stubbed)."""
    import parity.continuation as cont
    import parity.convert as conv
    from lmspec.trainstate import TrainState

    wrote = []
    monkeypatch.setattr(conv, "write_jax_run", lambda st, d, ov, say: wrote.append(
        ("jax", st.source["side"], d.name, list(ov))))
    monkeypatch.setattr(conv, "write_ds_run", lambda st, d, ov, say: wrote.append(
        ("ds", st.source["side"], d.name, list(ov))))
    monkeypatch.setattr(cont, "copy_source", lambda *a: wrote.append(("copy", a[2].name)))
    for kind in ("torch", "jax"):
        state = TrainState.__new__(TrainState)
        object.__setattr__(state, "source", {"side": kind, "checkpoint": "ck"})
        wrote.clear()
        how = [cont._prepare(spec, tmp_path, state, state, "bf16", 1)
               for spec in cont.continuation_plan(tmp_path, ("fp32", "bf16"), 1, 2, 3)]
        other = "jaxlm" if kind == "jax" else "DeepSpeed"
        own = "DeepSpeed (torchlm)" if kind == "torch" else "JAX (jaxlm)"
        if kind == "torch":
            assert how == [f"converted from the {other} checkpoint (parity convert)",
                           f"the {own} state re-written (fp32, ZeRO-1)",
                           f"the {own} state re-written (fp32, ZeRO-2)",
                           f"converted from the {other} checkpoint (parity convert)",
                           "its own checkpoint (ck), copied",
                           f"the {own} state re-written (bf16, ZeRO-2)"]
        else:
            assert how == [f"the {own} state re-written (fp32)"] + \
                [f"converted from the {other} checkpoint (parity convert)"] * 2 + \
                ["its own checkpoint (ck), copied"] + \
                [f"converted from the {other} checkpoint (parity convert)"] * 2
        assert ("ds", kind, "ds_zero2_bf16", ["train.precision=bf16", "zero.stage=2"]) in wrote


# ----------------------------------------------------------------------------- slow


def _train(side: str, out: Path, *overrides: str) -> Path:
    from parity.launch import default_trainer_cmd, jax_env

    cmd = default_trainer_cmd(side) + ["train", str(TINY), *ARGS, *overrides,
                                       f"train.steps={SOURCE_STEPS}", f"train.out_dir={out}",
                                       "--no-progress"]
    env = jax_env(os.environ, 2) if side == "jax" else dict(os.environ)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"source {side} {' '.join(overrides)}: {time.perf_counter() - t0:.0f} s")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source runs, trained once per module when a test first asks for them."""
    base = tmp_path_factory.mktemp("continue-sources")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            side, *ov = {"ds1": ("torch", "zero.stage=1"), "ds3": ("torch", "zero.stage=3"),
                         "jax": ("jax",), "jax3": ("jax", "zero.stage=3"),
                         "ds1bf16": ("torch", "zero.stage=1", "train.precision=bf16")}[name]
            made[name] = _train(side, base / name, *ov)
        return made[name]
    return get


def _continue(run_dir: Path, out: Path, alter=None, precisions=None) -> dict:
    from parity.continuation import ContinueOptions, continue_parity

    t0 = time.perf_counter()
    result = continue_parity(run_dir, ContinueOptions(out=out, steps=STEPS, alter=alter,
                                                      precisions=precisions))
    print(f"continue {run_dir.name}: {time.perf_counter() - t0:.0f} s")
    for c in result["checks"]:
        print(f"  {c['name']}: {c['value']:.3e} (limit {c['limit']:.3e}, "
              f"{'pass' if c['passed'] else 'FAIL'})")
    for i in result["info"]:
        print(f"  info {i['name']}: {i['value']}")
    return result


def _figures(result: dict) -> None:
    """The closing-note figures: loss rel diff over the continued steps, update rel err."""
    s = result["series"]
    for p in ("fp32", "bf16"):
        if f"jax {p}" not in s:
            continue
        jax = np.array(s[f"jax {p}"]["loss"])
        ds = np.array(next(v["loss"] for k, v in s.items()
                           if k.startswith("ds") and k.endswith(p)))
        print(f"  {p} loss rel diff over {len(jax)} continued steps: "
              f"max {np.max(np.abs(jax - ds) / np.abs(ds)):.3e}")
    upd = next(c for c in result["checks"] if c["key"] == "fp32.update")
    print(f"  update rel err at the first continued step: {upd['value']:.3e} "
          f"(limit {upd['limit']:.3e})")


FP32_KEYS = {"fp32.grad", "fp32.update", "fp32.loss"}
BF16_KEYS = {"bf16.loss_step0", "bf16.grad", "bf16.curve", "bf16.is_bf16"}


def _assert_all_pass(result: dict, keys: set[str] = FP32_KEYS) -> None:
    bad = [c["name"] for c in result["checks"] if not c["passed"]]
    assert not result["errors"] and not bad, (bad, result["errors"])
    have = {c["key"] for c in result["checks"]}
    assert keys | {"batch_fingerprint_mismatches", "lr_mismatches"} <= have, have


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("src", ["ds1", "ds3"])
def test_deepspeed_to_jax_continues(sources, tmp_path, src):
    run_dir = sources(src)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = _continue(run_dir, tmp_path / "out")
    _figures(result)
    _assert_all_pass(result)
    assert f"next step {SOURCE_STEPS}" in result["setup"]["continuation"]
    assert (tmp_path / "out" / "report.html").is_file()
    # the source folder is never written
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("src", ["jax", "jax3"])
def test_jax_to_deepspeed_continues(sources, tmp_path, src):
    """JAX -> DeepSpeed at the ZeRO stage of the JAX run's config (1, and 3 for jax3)."""
    result = _continue(sources(src), tmp_path / "out")
    _figures(result)
    _assert_all_pass(result)
    stage = 3 if src == "jax3" else 1
    assert f"ds zero{stage} fp32" in result["series"]
    assert "converted from the jaxlm checkpoint" in result["setup"]["runs"]


@pytest.mark.slow
@pytest.mark.parity
def test_wrong_conversion_fails(sources, tmp_path):
    """Moments dropped and step counts reset in the converted state: the update at the
    first continued step fails, and the loss curve, and the learning rates (jaxlm logs
    the rate at optax's schedule count, which the reset moved back to 0); the data
    position still holds."""
    def wrong(state):
        zeros = {k: np.zeros_like(v) for k, v in state.exp_avg.items()}
        return dataclasses.replace(state, exp_avg=zeros, exp_avg_sq=dict(zeros),
                                   adam_step=0, schedule_step=0)

    result = _continue(sources("ds1"), tmp_path / "out", alter=wrong)
    failed = {c["key"] for c in result["checks"] if not c["passed"]}
    assert {"fp32.update", "fp32.loss", "lr_mismatches"} <= failed, failed
    fp = [c for c in result["checks"] if c["key"] == "batch_fingerprint_mismatches"]
    assert fp and all(c["passed"] for c in fp)


@pytest.mark.slow
@pytest.mark.parity
def test_bf16_deepspeed_run_continues_in_fp32_and_bf16(sources, tmp_path):
    """A bf16 DeepSpeed run (BF16_Optimizer, ZeRO-1): by default continued in fp32 (the
    exact checks of the converted state) and in bf16 (its own checkpoint on the DeepSpeed
    side; judged by DeepSpeed bf16's distances), every check passes."""
    result = _continue(sources("ds1bf16"), tmp_path / "out")
    _figures(result)
    _assert_all_pass(result, FP32_KEYS | BF16_KEYS)
    assert sorted(result["series"]) == ["ds zero1 bf16", "ds zero1 fp32", "ds zero2 bf16",
                                        "ds zero2 fp32", "jax bf16", "jax fp32"]
    assert "ds zero1 bf16: its own checkpoint" in result["setup"]["runs"]
    assert "ds zero1 fp32: the DeepSpeed (torchlm) state re-written (fp32, ZeRO-1)" in \
        result["setup"]["runs"]
    names = [c["name"] for c in result["checks"]]
    assert f"bf16 zero1: loss at step {SOURCE_STEPS} vs float64" in names


@pytest.mark.slow
@pytest.mark.parity
def test_wrong_conversion_fails_in_bf16_alone(sources, tmp_path):
    """The same wrong conversion continued in bf16 only: the bf16 loss curve and the
    learning rates fail (no exact update check in bf16)."""
    def wrong(state):
        zeros = {k: np.zeros_like(v) for k, v in state.exp_avg.items()}
        return dataclasses.replace(state, exp_avg=zeros, exp_avg_sq=dict(zeros),
                                   adam_step=0, schedule_step=0)

    result = _continue(sources("ds1bf16"), tmp_path / "out", alter=wrong,
                       precisions=("bf16",))
    failed = {c["key"] for c in result["checks"] if not c["passed"]}
    assert {"bf16.curve", "lr_mismatches"} <= failed, failed

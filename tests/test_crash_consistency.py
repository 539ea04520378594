"""Crash consistency: SIGKILL at random moments, resume, end bitwise where an uninterrupted
run ends (issue 11). Kills the whole process group (a machine losing power, not one
process): `jaxlm train`, `torchlm train` at ZeRO-1 and ZeRO-3 with a checkpoint every
step (so kills land during saves as well as between them), and the token-cache build; two
concurrent `parity data` on an empty cache agree. Slow: about 5 minutes on 2 cores."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmspec.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 10
RNG = random.Random(20261123)  # the kill moments: random, and the same every CI run
KILLS: list[str] = []  # what each kill hit, printed at the end of each test


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _cmd(side: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"{side}.cli", "train", str(TINY), f"train.out_dir={out}",
            f"train.steps={STEPS}", "train.eval_every=0", "train.ckpt_every=1",
            "train.ckpt_keep=2", "--no-progress", *extra]


def _records(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _saving(side: str, out: Path) -> bool:
    """A checkpoint is being written right now (a temporary or unfinished folder)."""
    ck = out / "checkpoints"
    if not ck.is_dir():
        return False
    names = [p.name for p in ck.iterdir()]
    if side == "jaxlm":
        return any("tmp" in n for n in names)
    return any(n.startswith("step") and not (ck / n / "checksums.json").exists()
               for n in names)


def _killed_run(side: str, out: Path, kills: int, extra: tuple[str, ...]) -> int:
    """Run to STEPS steps, SIGKILLing the process group ``kills`` times at random
    moments (after a random number of steps plus a random delay) and resuming each
    time; the number of kills that landed while a checkpoint was being written."""
    during_save = 0
    for k in range(kills + 1):
        proc = subprocess.Popen(_cmd(side, out, *extra), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        if k == kills:  # the last start runs to the end
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
            return during_save
        metrics = out / "metrics.jsonl"
        start = _records(metrics)
        target = min(STEPS - 1, start + RNG.randint(1, 3))
        deadline = time.monotonic() + 300
        while _records(metrics) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        time.sleep(RNG.uniform(0.0, 0.6))
        saving = _saving(side, out)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        during_save += saving
        KILLS.append(f"{side} {' '.join(extra)} kill {k + 1}: after {_records(metrics)} "
                     f"records{' during a save' if saving else ''}")
    return during_save


def _final_params(side: str, out: Path) -> dict[str, np.ndarray]:
    if side == "jaxlm":
        import jax

        from jaxlm.generate import load_params

        _, params, step = load_params(out)
        assert step == STEPS
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}
    from lmspec.weights import load_safetensors

    return load_safetensors(out / "model.safetensors")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("side,extra,kills", [
    ("jaxlm", (), 3),
    ("torchlm", ("zero.stage=1",), 3),
    ("torchlm", ("zero.stage=3",), 3),
])
def test_random_kills_then_resume_end_bitwise(tmp_path, side, extra, kills):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run(_cmd(side, ref, *extra), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    during = _killed_run(side, out, kills, extra)
    print("\n".join(KILLS[-kills:]), f"\n{during} of {kills} during a save")
    a = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(b) == list(range(STEPS))
    for s in range(STEPS):  # bitwise: the same floats, every step
        for key in ("loss", "grad_norm", "lr", "batch_fingerprint"):
            assert a[s][key] == b[s][key], (s, key, a[s][key], b[s][key])
    pa, pb = _final_params(side, ref), _final_params(side, out)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def _data_cmd(cfg_over: list[str]) -> list[str]:
    return [sys.executable, "-m", "parity.cli", "data", str(TINY), *cfg_over]


def _fingerprint(text: str) -> str:
    m = re.search(r"fingerprint\S*\s*:?\s*(\S+)", text)
    assert m, text
    return m.group(1)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 30 MB of text: a few seconds to tokenize, time to be killed in."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    lines = [" ".join(rng.choice(words, 12)) + "\n" for _ in range(400_000)]
    p = tmp_path / "corpus.txt"
    p.write_text("".join(lines))
    return p


@pytest.mark.slow
def test_killed_cache_builds_then_a_complete_one_and_concurrent_builds(tmp_path, corpus):
    ref = subprocess.run(_data_cmd([f"data.source=text:{corpus}",
                                    f"data.cache_dir={tmp_path / 'ref'}"]),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _fingerprint(ref.stdout)
    t_build = float(re.search(r"load time:\s+([0-9.]+) s", ref.stdout).group(1))
    over = [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'killed'}"]
    for k in range(2):  # SIGKILL part-way through the build, twice
        proc = subprocess.Popen(_data_cmd(over), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / f"kill{k}.log", "w"),
                                start_new_session=True)
        tokens = tmp_path / "killed" / "tokens"
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (tokens.is_dir() and any(tokens.iterdir())):
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.01)  # the build has its lock: tokenizing from here on
        time.sleep(RNG.uniform(0, 0.7 * t_build))
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        KILLS.append(f"token cache kill {k + 1}: "
                     + ("during the build" if alive else f"too late (exit {proc.returncode})")
                     + f" (a build takes {t_build:.1f} s)")
    again = subprocess.run(_data_cmd(over), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _fingerprint(again.stdout) == want
    print("\n".join(KILLS[-2:]))
    # two builds at once on an empty cache: both succeed, one fingerprint
    over = [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'concurrent'}"]
    procs = [subprocess.Popen(_data_cmd(over), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert {_fingerprint(o) for o, _ in outs} == {want}

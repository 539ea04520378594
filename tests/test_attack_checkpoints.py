"""Planted faults in checkpoints and token caches: each is refused with one ``error: ...``
line naming the file (exit status 2, no traceback) and leaves every file as it was; a
non-finite loss or grad norm stops a run with exit status 3 and saves nothing after the
last good checkpoint (``train.nan_policy``).

One trained run per trainer (module fixtures, 2 steps, a checkpoint after each) is copied
per case. The refusals happen before anything is compiled or launched, so the command
lines are called in this process (``lmspec.cli.run``); only the DeepSpeed run that
produces the checkpoints is launched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lmspec.cli import run
from lmspec.integrity import CHECKSUMS, verify_checksums
from lmspec.nonfinite import EXIT_NON_FINITE

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "data.seq_len=16",
         "data.tokenizer=byte", "data.val_fraction=0", "train.eval_every=0",
         "train.ckpt_every=1", "train.steps=2", "train.log_every=1"]
TORCH = ["zero.stage=1", "zero.world_size=2", "train.micro_batch_size=2"]
LAUNCH_TIMEOUT = 600


def _corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000))
    path = root / "corpus.txt"
    path.write_text(text)
    return path


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", CONFIG, *SMALL, f"data.source={root / 'corpus.txt'}",
            f"data.cache_dir={root / 'cache'}", f"train.out_dir={out}", "--no-progress",
            *extra]


def jax_cli(argv: list[str]) -> int:
    from jaxlm.cli import _main

    return run(_main, argv)


def torch_cli(argv: list[str]) -> int:
    from torchlm.cli import main

    return main(argv)


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (the state a refused run must leave)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jax")
    _corpus(root)
    assert jax_cli(_args(root, root / "run")) == 0
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["1", "2"]
    return root


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch")
    _corpus(root)
    cmd = [sys.executable, "-m", "torchlm.cli", *_args(root, root / "run"), *TORCH]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tags = sorted(p.name for p in (root / "run" / "checkpoints").glob("step*"))
    assert tags == ["step00000001", "step00000002"]
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    """A private copy of a fixture's folder (run + token cache + corpus)."""
    dst = tmp_path / "case"
    shutil.copytree(root, dst)
    return dst


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _noise(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))
    return path


def _truncate(path: Path) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _zero(path: Path) -> Path:
    path.write_bytes(bytes(path.stat().st_size))
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"{not json \x00\xff garbage")
    return path


def _tokens_folder(case: Path) -> Path:
    (folder,) = [p for p in (case / "cache" / "tokens").iterdir() if p.is_dir()]
    return folder


def _overwrite_tokens(case: Path) -> Path:
    """tokens.bin rewritten in place with other tokens, same size."""
    path = _tokens_folder(case) / "tokens.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    np.roll(tokens, 7).tofile(path)
    return path


def _manifest_dtype(case: Path) -> Path:
    """A manifest that calls the uint16 file uint32 (half as many tokens: same bytes)."""
    path = _tokens_folder(case) / "manifest.json"
    m = json.loads(path.read_text())
    assert m["dtype"] == "uint16"
    m["dtype"], m["num_tokens"] = "uint32", m["num_tokens"] // 2
    path.write_text(json.dumps(m))
    return path


JAX_CKPT = "run/checkpoints/2"
JAX_FAULTS: dict[str, Callable[[Path], Path]] = {
    "noise_in_largest_data_file": lambda c: _noise(_largest(c / JAX_CKPT / "state")),
    "truncated_data_file": lambda c: _truncate(_largest(c / JAX_CKPT / "state")),
    "zeroed_data_file": lambda c: _zero(_largest(c / JAX_CKPT / "state")),
    "garbage_orbax_metadata": lambda c: _garbage(c / JAX_CKPT / "state" / "_METADATA"),
    "garbage_meta_json": lambda c: _garbage(c / JAX_CKPT / "meta" / "metadata"),
    "garbage_checksum_list": lambda c: _garbage(c / JAX_CKPT / CHECKSUMS),
    "tokens_overwritten_same_size": _overwrite_tokens,
    "manifest_dtype_wrong": _manifest_dtype,
}

DS_CKPT = "run/checkpoints/step00000002"
TORCH_FAULTS: dict[str, Callable[[Path], Path]] = {
    "latest_empty": lambda c: (
        (c / "run/checkpoints/latest").write_text(""), c / "run/checkpoints/latest")[1],
    "latest_zeroed": lambda c: _zero(c / "run" / "checkpoints" / "latest"),
    "latest_names_missing_tag": lambda c: (
        (c / "run/checkpoints/latest").write_text("step00000009"), c / "run/checkpoints/latest"
    )[1],
    "noise_in_rank0_optimizer_state": lambda c: _noise(
        c / DS_CKPT / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "missing_rank1_optimizer_file": lambda c: (
        (c / DS_CKPT / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
        c / DS_CKPT / "zero_pp_rank_1_mp_rank_00_optim_states.pt")[1],
    "truncated_model_states": lambda c: _truncate(c / DS_CKPT / "mp_rank_00_model_states.pt"),
    "garbage_model_states": lambda c: _garbage(c / DS_CKPT / "mp_rank_00_model_states.pt"),
    "tokens_overwritten_same_size": _overwrite_tokens,
    "manifest_dtype_wrong": _manifest_dtype,
}


def _assert_refused(rc: int, err: str, named: Path, before: dict[str, str],
                    case: Path) -> str:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert str(named) in lines[0], lines[0]
    assert tree_hashes(case) == before, "a refused run changed the files"
    return lines[0]


@pytest.mark.parametrize("fault", sorted(JAX_FAULTS))
def test_jax_fault_refused(fault, jax_run, tmp_path, capsys) -> None:
    case = _copy(jax_run, tmp_path)
    named = JAX_FAULTS[fault](case)
    before = tree_hashes(case)
    capsys.readouterr()
    rc = jax_cli(_args(case, case / "run", "train.steps=4"))
    line = _assert_refused(rc, capsys.readouterr().err, named, before, case)
    if "checkpoints" in str(named):  # the previous checkpoint is offered
        assert "--no-resume" in line and str(case / "run/checkpoints/1") in line, line


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", sorted(TORCH_FAULTS))
def test_torch_fault_refused(fault, torch_run, tmp_path, capsys) -> None:
    case = _copy(torch_run, tmp_path)
    named = TORCH_FAULTS[fault](case)
    before = tree_hashes(case)
    capsys.readouterr()
    rc = torch_cli([*_args(case, case / "run", "train.steps=4"), *TORCH])
    line = _assert_refused(rc, capsys.readouterr().err, named, before, case)
    if "latest" in fault:  # the tags that exist are offered
        assert "step00000001, step00000002" in line, line
        if fault != "latest_names_missing_tag":
            assert "empty or unreadable (a torn write?)" in line, line
    elif "checkpoints" in str(named):
        assert "step00000001 (the previous checkpoint)" in line, line


def test_checkpoint_without_checksums_warns_then_still_refuses_damage(jax_run, tmp_path,
                                                                      capsys) -> None:
    """An older checkpoint (no list) is taken with a warning; what Orbax cannot parse is
    still one error line naming the folder, files unchanged."""
    case = _copy(jax_run, tmp_path)
    (case / JAX_CKPT / CHECKSUMS).unlink()
    _garbage(case / JAX_CKPT / "state" / "_METADATA")
    before = tree_hashes(case)
    capsys.readouterr()
    rc = jax_cli(_args(case, case / "run", "train.steps=4"))
    err = capsys.readouterr().err
    _assert_refused(rc, err, case / JAX_CKPT, before, case)
    assert f"warning: {case / JAX_CKPT} has no {CHECKSUMS}" in err, err[-3000:]


def test_latest_checkpoint_and_nan_policy_validation(tmp_path) -> None:
    from lmspec.config import ConfigError, load_config
    from lmspec.errors import UserError
    from lmspec.nonfinite import Guard, NonFiniteError
    from torchlm.runfolder import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None  # no checkpoints yet: a fresh start
    (tmp_path / "checkpoints" / "step00000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000003\n")
    assert latest_checkpoint(tmp_path) == "step00000003"
    (tmp_path / "checkpoints" / "latest").write_text("../elsewhere")
    with pytest.raises(UserError, match="step00000003"):
        latest_checkpoint(tmp_path)
    for bad in ("skip", "skip:-1", "nan", "skip:1x"):
        with pytest.raises(ConfigError, match="train.nan_policy"):
            load_config(CONFIG, [f"train.nan_policy={bad}"])
    guard = Guard("skip:1", last_checkpoint="ck/2")
    assert guard.check(0, 1.0, 2.0)
    assert not guard.check(1, float("nan"), 2.0)
    with pytest.raises(NonFiniteError, match=r"step 2: grad_norm inf.*ck/2"):
        guard.check(2, 1.0, float("inf"))
    with pytest.raises(NonFiniteError, match="its update was applied"):
        Guard("skip:5").check(0, float("nan"), 1.0, update_skipped=False)


def test_checkpoints_carry_checksums(jax_run, torch_run) -> None:
    for folder in [jax_run / "run/checkpoints/1", jax_run / "run/checkpoints/2",
                   torch_run / "run/checkpoints/step00000001", torch_run / DS_CKPT]:
        assert verify_checksums(folder, "unused"), folder
        listed = json.loads((folder / CHECKSUMS).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != CHECKSUMS}
        assert set(listed) == on_disk, folder


# ----------------------------------------------------------------------------- non-finite

HUGE_LR = ["optim.lr=1e6", "optim.warmup_steps=0", "train.steps=8", "train.ckpt_every=100"]


def _stop_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize(("policy", "skips"), [("stop", 0), ("skip:1", 1)])
def test_jax_non_finite_stops(policy, skips, jax_run, tmp_path, capsys) -> None:
    """Resumed at step 2 with LR 1e6 the loss or norm turns NaN within a few steps; the
    run stops (after ``skips`` skipped steps) with exit status 3 and no save after the
    resumed checkpoint, which stays as it was."""
    case = _copy(jax_run, tmp_path)
    ckpts = case / "run" / "checkpoints"
    before = tree_hashes(ckpts)
    capsys.readouterr()
    rc = jax_cli(_args(case, case / "run", *HUGE_LR, f"train.nan_policy={policy}"))
    err = capsys.readouterr().err
    assert rc == EXIT_NON_FINITE, err[-3000:]
    line = _stop_line(err)
    assert f"train.nan_policy={policy}" in line and str(ckpts / "2") in line, line
    assert tree_hashes(ckpts) == before  # nothing saved over or beside the good one
    records = [json.loads(r) for r in (case / "run/metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("update_skipped")]
    stop_step = int(line.split("step ", 1)[1].split(":", 1)[0])
    assert records[-1]["step"] == stop_step
    assert len(skipped) == skips + 1 and skipped[-1] == stop_step


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("policy", "extra", "marked"), [
    ("stop", (), 1),
    ("skip:2", (), 3),
    # ZeRO 0 fp32 steps a plain torch AdamW, which applies a NaN update: no skip possible
    ("skip:3", ("zero.stage=0", "zero.world_size=1", "train.micro_batch_size=1"), 0),
])
def test_torch_non_finite_stops(policy, extra, marked, tmp_path) -> None:
    """DeepSpeed at LR 1e6: its grad norm is inf or NaN from step 2; ZeRO 1 skips those
    updates itself (``marked``: records with ``update_skipped``); the run stops with exit
    status 3, naming the last good checkpoint, which verifies and is the newest."""
    _corpus(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torchlm.cli", *_args(tmp_path, out), *TORCH, *extra,
           "optim.lr=1e6", "optim.warmup_steps=0", "train.steps=8",
           f"train.nan_policy={policy}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env={**os.environ})
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = _stop_line(proc.stderr)
    stop_step = int(line.split("step ", 1)[1].split(":", 1)[0])
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert tags[-1] == f"step{stop_step:08d}"  # no save after the stop step
    assert str(out / "checkpoints" / tags[-1]) in line, line
    assert verify_checksums(out / "checkpoints" / tags[-1], "unused")
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == stop_step
    assert sum(1 for r in records if r.get("update_skipped")) == marked
    if not marked:
        assert "its update was applied" in line, line


class _DeepSpeedOrder:
    """An engine whose ``save_checkpoint`` writes as DeepSpeed 0.19 does with two ranks:
    rank 0's files, ``latest`` (unless ``save_latest=False``), then rank 1's partition;
    ``probe`` runs at the moment rank 1 is still writing (where a kill tears it)."""

    def __init__(self, probe: Callable[[], None]) -> None:
        self.probe = probe

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool = True) -> bool:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"rank 0" + tag.encode())
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)
        self.probe()
        (folder / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank 1" + tag.encode())
        return True


def test_a_kill_during_a_deepspeed_save_leaves_latest_naming_a_complete_checkpoint(
        tmp_path, monkeypatch) -> None:
    """The crash the random-kill test found in CI: ``latest`` named a checkpoint whose
    rank-1 partition was half written. At the moment of the kill, ``latest`` must name a
    checkpoint that verifies against its checksums."""
    import torch.distributed as dist

    from torchlm.runfolder import latest_checkpoint, save_engine_checkpoint, verify_checkpoint

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    seen: list[tuple[str | None, bool]] = []

    def probe() -> None:  # what a resume after a kill right now would load
        tag = latest_checkpoint(tmp_path)
        seen.append((tag, tag is not None and verify_checkpoint(tmp_path, tag)))

    engine = _DeepSpeedOrder(probe)
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 2):  # the second save of step 2 writes over a complete folder
        assert save_engine_checkpoint(engine, ckpt, step) == f"step{step:08d}"
        assert latest_checkpoint(tmp_path) == f"step{step:08d}"
        assert verify_checkpoint(tmp_path, f"step{step:08d}")
    # during the first save there is nothing to resume, during the second step 1; writing
    # over the folder ``latest`` names (a --no-resume run) starts over, never loads torn
    assert seen == [(None, False), ("step00000001", True), (None, False)]
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]

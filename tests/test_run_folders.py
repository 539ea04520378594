"""Each trainer's run folder: ``{framework}`` in train.out_dir (runs/NAME-jax,
runs/NAME-ds), and a folder holding the other trainer's run refused before anything in
it is touched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.config import load_config
from lmspec.errors import UserError
from lmspec.runs import check_run_owner, for_framework

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_framework_placeholder_gives_each_trainer_its_folder():
    cfg = load_config(TINY)
    assert cfg.train.out_dir == "runs/tiny-{framework}"
    assert for_framework(cfg, "jax").train.out_dir == "runs/tiny-jax"
    assert for_framework(cfg, "torch").train.out_dir == "runs/tiny-ds"
    plain = load_config(TINY, ["train.out_dir=/tmp/x"])
    assert for_framework(plain, "jax") is plain


@pytest.mark.parametrize("side,layout,other", [
    ("jax", ["checkpoints/latest", "checkpoints/step00000010/x"], "DeepSpeed"),
    ("torch", ["checkpoints/10/x"], "Orbax"),
    ("torch", [], "a jaxlm run"),
])
def test_the_other_trainers_folder_is_refused(tmp_path, side, layout, other):
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    if not layout:
        (tmp_path / "run_summary.json").write_text(json.dumps({"side": "jax"}))
    with pytest.raises(UserError, match=other):
        check_run_owner(tmp_path, side)
    check_run_owner(tmp_path / "fresh", side)  # nothing there: fine
    mine = tmp_path / "mine"
    (mine / "checkpoints" / ("10" if side == "jax" else "step00000010")).mkdir(parents=True)
    check_run_owner(mine, side)  # its own run: fine


def test_jaxlm_train_refuses_a_deepspeed_run_folder_untouched(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000004")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "config.yaml").write_text("name: theirs\n")

    def digest() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = digest()
    done = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", str(TINY),
                           f"train.out_dir={run}", "train.steps=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "holds DeepSpeed (torchlm) checkpoints" in done.stderr
    assert "Traceback" not in done.stderr
    assert digest() == before

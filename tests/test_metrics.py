"""lmspec.metrics: the metrics.jsonl writer and reader both trainers share."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmspec.metrics import REQUIRED_FIELDS, MetricsWriter, read_metrics


def record(step: int, **extra) -> dict:
    return {"step": step, "loss": 5.0 - 0.1 * step, "grad_norm": 1.0 + step, "lr": 1e-3,
            "tokens_per_s": 1234.5, "mfu": None, "batch_fingerprint": f"{step:016x}",
            "wall_time": 1000.0 + step, **extra}


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for s in range(3):
            w.write(record(s, val_loss=4.5 if s == 2 else None))
        # numpy scalars (what trainers hold) are written as plain numbers
        w.write({**record(3), "loss": np.float32(2.5), "step": np.int64(3)})
    back = read_metrics(path)
    assert [r["step"] for r in back] == [0, 1, 2, 3]
    assert back[0] == record(0, val_loss=None)
    assert back[2]["val_loss"] == 4.5
    assert back[3]["loss"] == 2.5 and type(back[3]["step"]) is int
    assert set(REQUIRED_FIELDS) <= set(back[1])


def test_non_finite_loss_survives(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write({**record(0), "loss": float("nan"), "grad_norm": float("inf")})
    for line in path.read_text().splitlines():
        json.loads(line)  # still strict JSON
    (r,) = read_metrics(path)
    assert math.isnan(r["loss"]) and r["grad_norm"] == math.inf


def test_missing_field_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        bad = record(0)
        del bad["batch_fingerprint"]
        with pytest.raises(ValueError, match="batch_fingerprint"):
            w.write(bad)
    rec = record(0)
    del rec["grad_norm"]
    path.write_text(json.dumps(record(0)) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*grad_norm"):
        read_metrics(path)
    with pytest.raises(ValueError, match="grad_norm"):
        read_metrics(path, strict=False)  # tolerance is for torn lines only
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "absent.jsonl")


def test_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    full = "".join(json.dumps(record(s)) + "\n" for s in range(3))
    path.write_text(full + json.dumps(record(3))[:25])  # crash mid-write
    assert [r["step"] for r in read_metrics(path, strict=False)] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not a JSON record"):
        read_metrics(path)
    # a torn line that is not the last one is corruption, not a crash
    lines = full.splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20] + "\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r":2: not a JSON record"):
        read_metrics(path, strict=False)


def test_resume_truncates_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for s in range(5):
            w.write(record(s))
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # torn record of a step that never finished
    # the checkpoint was taken after step 2: steps 3.. are redone
    with MetricsWriter(path, start_step=3) as w:
        assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
        w.write(record(3, resumed=True))
    back = read_metrics(path)
    assert [r["step"] for r in back] == [0, 1, 2, 3]
    assert back[3]["resumed"] is True
    # a fresh run (start_step 0) starts an empty file
    with MetricsWriter(path, start_step=0):
        pass
    assert read_metrics(path) == []


def test_fingerprint_parts_field(tmp_path):
    """The optional per-(micro-step, rank) fingerprints round-trip and are validated."""
    path = tmp_path / "metrics.jsonl"
    parts = ["0123456789abcdef", "fedcba9876543210"]
    with MetricsWriter(path) as w:
        w.write(record(0, batch_fingerprint_parts=parts))
        for bad in ([], ["0123"], "0123456789abcdef", ["0123456789ABCDEF"]):
            with pytest.raises(ValueError, match="batch_fingerprint_parts"):
                w.write(record(1, batch_fingerprint_parts=bad))
    (r,) = read_metrics(path)
    assert r["batch_fingerprint_parts"] == parts


def test_damaged_metrics_file_is_a_user_error_with_the_fix(tmp_path):
    """A damaged metrics.jsonl met on resume: one error line naming the file, the line
    and what to do (exit status 2 through lmspec.cli), not a bug's traceback."""
    from lmspec.errors import UserError

    p = tmp_path / "metrics.jsonl"
    for body, where in ((b"garbage\n{}\n", ":1: not a JSON record"),
                        (b"[1, 2]\n", ":1: not a JSON object"),
                        (b"\xff\xfe\x00junk\n", "not UTF-8 text at byte 0")):
        p.write_bytes(body)
        with pytest.raises(UserError, match=where) as e:
            read_metrics(p, strict=False)
        assert "--no-resume" in str(e.value)


def _tb_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_writer_writes_the_tensorboard_tags(tmp_path):
    """One helper for both trainers: every record's figures as train/<field> scalars in
    <run>/tb, readable by the `tensorboard` program's own reader."""
    from lmspec.metrics import TENSORBOARD_FIELDS

    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path / "metrics.jsonl") as w:
        for step in range(3):
            w.write({**{k: 1.0 for k in REQUIRED_FIELDS}, "step": step,
                     "loss": 5.0 - step, "mfu": None, "batch_fingerprint": "ab",
                     "val_loss": 4.0})
    scalars = _tb_scalars(tmp_path / "tb")
    assert set(scalars) == {f"train/{k}" for k in TENSORBOARD_FIELDS if k != "mfu"}
    assert scalars["train/loss"] == [(0, 5.0), (1, 4.0), (2, 3.0)]

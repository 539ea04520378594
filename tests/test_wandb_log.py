"""Weights & Biases logging (``log.wandb``, lmspec.wandb_log): both trainers' metrics
records land in an offline W&B run with the names and values of ``metrics.jsonl``.

The offline run is read back from its ``run-<id>.wandb`` file (W&B's append-only record
log: a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks, each with a CRC-32,
a length and a first/middle/last type, holding ``wandb_internal_pb2.Record`` protobufs),
independently of the code that wrote it. Nothing reaches the network: the mode is
offline and W&B's base URL points at a closed local port.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from lmspec.config import ConfigError, load_config, save_config
from lmspec.errors import UserError
from lmspec.metrics import MetricsWriter, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, its own folders under tmp_path, no credentials, no network."""
    pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]' "
                        "(scripts/test.sh installs it)")
    home = tmp_path / "wandb_home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: never used
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb

    wandb.teardown()  # the W&B service process of this test process


# ----------------------------------------------------------------------------- reader

_BLOCK, _HEADER = 32768, 7


def _chunks(data: bytes):
    """Payloads of a W&B/LevelDB record log after its 7-byte file header."""
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        assert len(payload) == length, "truncated chunk"
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"bad CRC at byte {pos}"
        pos += _HEADER + length
        if kind == 1:  # full
            yield payload
        elif kind == 2:  # first
            pending = payload
        elif kind == 3:  # middle
            pending += payload
        elif kind == 4:  # last
            yield pending + payload
            pending = b""
        else:
            raise AssertionError(f"chunk type {kind} at byte {pos}")


def offline_run(out_dir: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], Any]:
    """(config, {step: logged fields}, run record) of the one offline W&B run under
    ``out_dir/wandb``."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # run.finish() returns before W&B's service process has written the run's records to
    # the file (seen here: the 7-byte header alone, the rest 2 s later, 1 time in 30 on
    # loaded cores); shutting the service down waits for its writer, as process exit does.
    wandb.teardown()
    files = sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    config: dict[str, Any] = {}
    history: dict[int, dict[str, Any]] = {}
    run = None
    for payload in _chunks(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
            history[int(row["_step"])] = row
    return config, history, run


def assert_same_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every metrics.jsonl record is a W&B history row at its step with the same fields
    and values (null fields left out); returns the records."""
    records = read_metrics(out_dir / "metrics.jsonl")
    _, history, _ = offline_run(out_dir)
    assert sorted(history) == [r["step"] for r in records]
    for r in records:
        row = history[r["step"]]
        for k, v in r.items():
            if v is None:
                assert k not in row, k
            elif isinstance(v, float) and math.isnan(v):
                assert math.isnan(row[k]), k
            else:
                assert row[k] == v, (r["step"], k, row[k], v)
    return records


# ----------------------------------------------------------------------------- config


def test_config_section_defaults_values_and_round_trip(tmp_path):
    cfg = load_config(TINY)
    assert cfg.log.wandb == "off"  # off unless asked for
    for bad in ("yes", "Offline", "disabled"):
        with pytest.raises(ConfigError, match=r"log\.wandb=.*allowed are \['off', "
                           r"'offline', 'online'\]"):
            load_config(TINY, [f"log.wandb={bad}"])
    with pytest.raises(ConfigError, match=r"log\.wandb_project=.*none of"):
        load_config(TINY, ["log.wandb_project=a/b"])
    with pytest.raises(ConfigError, match="unknown key 'log.wandb_dir'"):
        load_config(TINY, ["log.wandb_dir=x"])
    y = tmp_path / "c.yaml"
    y.write_text(f"base: {TINY}\nlog:\n  wandb: off\n")  # YAML reads a bare off as false
    assert load_config(y).log.wandb == "off"
    cfg = load_config(TINY, ["log.wandb=online", "log.wandb_project=p", "log.wandb_name=n"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_parity_runs_leave_wandb_off():
    from parity.profiles import without_wandb

    said: list[str] = []
    cfg = without_wandb(load_config(TINY, ["log.wandb=online"]), said.append)
    assert cfg.log.wandb == "off" and "log.wandb=online ignored" in said[0]


# ----------------------------------------------------------------------------- errors


def test_missing_wandb_is_a_user_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    from lmspec.wandb_log import require_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    require_wandb(load_config(TINY))  # off: nothing needed
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", "log.wandb=offline"])
    with pytest.raises(UserError, match=r"log\.wandb=offline needs the wandb package.*"
                       r"jaxlm-parity\[wandb\]"):
        require_wandb(cfg)
    with pytest.raises(UserError, match="needs the wandb package"):
        MetricsWriter(tmp_path / "m" / "metrics.jsonl", config=cfg)
    # both trainers stop before any work (exit status 2, one error line)
    from torchlm.cli import main as torchlm_main

    assert torchlm_main(["train", str(TINY), f"train.out_dir={tmp_path / 'ds'}",
                         "log.wandb=online", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jaxlm-parity[wandb]" in err[0], err
    pytest.importorskip("jax")
    from jaxlm.trainer import train

    with pytest.raises(UserError, match="needs the wandb package"):
        train(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # nothing written


def test_wandb_failure_after_start_warns_once_and_metrics_go_on(tmp_path, wandb_env, capsys):
    cfg = load_config(TINY, [f"train.out_dir={tmp_path}", "log.wandb=offline"])
    rec = {"step": 0, "loss": 5.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 10.0,
           "mfu": None, "batch_fingerprint": "0" * 16, "wall_time": 1.0}
    with MetricsWriter(tmp_path / "metrics.jsonl", config=cfg) as w:
        w.write(rec)

        def broken(*a, **k):
            raise ConnectionError("W&B went away")

        w.wandb.run.log = broken
        for step in (1, 2, 3):
            w.write({**rec, "step": step})
    err = capsys.readouterr().err
    assert err.count("warning: W&B logging failed") == 1, err
    assert "at step 1" in err and "W&B went away" in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_online_without_credentials_is_a_user_error(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored W&B key either
    cfg = load_config(TINY, [f"train.out_dir={tmp_path}", "log.wandb=online"])
    with pytest.raises(UserError, match=r"log\.wandb=online: W&B could not start a run .*"
                       r"wandb login"):
        MetricsWriter(tmp_path / "metrics.jsonl", config=cfg)


# ----------------------------------------------------------------------------- logging


def test_metrics_writer_logs_every_field_and_the_config(tmp_path, wandb_env):
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'tiny-jax'}", "log.wandb=offline"])
    out = Path(cfg.train.out_dir)
    parts = ["0123456789abcdef", "fedcba9876543210"]
    with MetricsWriter(out / "metrics.jsonl", config=cfg) as w:
        for step in range(4):
            w.write({"step": step, "loss": float("nan") if step == 2 else 5.0 - 0.25 * step,
                     "grad_norm": 1.0 / (step + 1), "lr": 1e-3 * step, "tokens_per_s": 123.5,
                     "mfu": None, "batch_fingerprint": f"{step:016x}", "wall_time": 1e9 + step,
                     "batch_fingerprint_parts": parts, "val_loss": 4.5 if step == 3 else None,
                     **({"update_skipped": True} if step == 2 else {})})
    records = assert_same_records(out)
    assert math.isnan(records[2]["loss"]) and records[2]["update_skipped"] is True
    config, history, run = offline_run(out)
    assert history[3]["val_loss"] == 4.5 and history[0]["batch_fingerprint_parts"] == parts
    want = cfg.to_dict()
    assert {k: config[k] for k in want} == json.loads(json.dumps(want))
    assert run.display_name == "tiny-jax" and run.project == "jaxlm-parity"


def _check_trainer_run(out: Path, steps: int) -> None:
    records = assert_same_records(out)
    assert [r["step"] for r in records] == list(range(steps))
    config, history, run = offline_run(out)
    assert [history[s]["loss"] for s in range(steps)] == [r["loss"] for r in records]
    assert config["train"]["out_dir"] == str(out) and config["log"]["wandb"] == "offline"
    assert run.display_name == out.name


@pytest.mark.slow  # ~20-25 s on 2 cores (jax start-up, compile); CI runs it
def test_jaxlm_train_logs_to_wandb_offline(tmp_path, wandb_env):
    pytest.importorskip("jax")
    from jaxlm.trainer import train

    out = tmp_path / "tiny-jax"
    cfg = load_config(TINY, [f"train.out_dir={out}", "train.steps=3", "train.eval_every=0",
                             "train.log_every=1000", "log.wandb=offline"])
    train(cfg, progress=False, log=lambda s: None)
    _check_trainer_run(out, 3)


@pytest.mark.slow  # ~15-40 s on 2 cores (DeepSpeed start-up); CI runs it
@pytest.mark.multiprocess
def test_torchlm_train_logs_to_wandb_offline(tmp_path, wandb_env):
    pytest.importorskip("deepspeed")
    out = tmp_path / "tiny-ds"
    proc = subprocess.run(
        [sys.executable, "-m", "torchlm.cli", "train", str(TINY), f"train.out_dir={out}",
         "train.steps=2", "train.eval_every=0", "zero.world_size=1", "zero.stage=1",
         "train.micro_batch_size=4", "log.wandb=offline", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_trainer_run(out, 2)

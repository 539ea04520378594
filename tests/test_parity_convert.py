"""``parity convert``: a run's whole train state from DeepSpeed to JAX and back (issue 13).

Fast (default suite): the neutral state's checks, the JAX side written and read back bit
for bit on synthetic states, and every refusal (wrong kind of folder, no checkpoint, a
destination that is not empty, a checkpoint of another model, a frozen override), each
leaving nothing behind.

Slow (DeepSpeed workers): ZeRO-1 and ZeRO-3 runs on 2 ranks converted to JAX and back,
bit for bit, against DeepSpeed's own offline readers (``zero_to_fp32`` for the weights,
the universal-checkpoint converter for the moments and the step) and torchlm's gathered
weights; the converted folders resumed by ``jaxlm train`` and ``torchlm train`` at the
right step, LR and batch; a bf16 ZeRO-1 state (DeepSpeed's ``BF16_Optimizer``) to ZeRO-0
and back; an optimizer that is not the config's refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.errors import UserError
from lmspec.trainstate import TENSOR_KINDS, TrainState
from lmspec.weights import init_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CACHE = f"data.cache_dir={ROOT / '.cache' / 'lmspec'}"
# world size 2, micro batch 2, global batch 8: 2 accumulation steps per optimizer step
DS_ARGS = ["train.micro_batch_size=2", "zero.world_size=2", "train.eval_every=0",
           "train.ckpt_every=0", CACHE]
TRAIN_STEPS = 4  # DeepSpeed steps before the conversion
JAX_STEPS = 6  # the converted JAX run continues to here
BACK_STEPS = 7  # and the DeepSpeed run converted back from it to here


def _cfg(*overrides: str):
    return load_config(TINY, [*DS_ARGS, *overrides])


def synthetic_state(cfg, next_step: int = 5, seed: int = 1) -> TrainState:
    """Weights from the shared init, moments random (second moments >= 0), counters
    apart from each other so a swap would show."""
    rng = np.random.default_rng(seed)
    params = init_weights(cfg.model, seed)
    m = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()}
    v = {k: np.abs(rng.standard_normal(v.shape, dtype=np.float32)) for k, v in params.items()}
    return TrainState(config=cfg, params=params, exp_avg=m, exp_avg_sq=v, adam_step=next_step - 1,
                      schedule_step=next_step - 2, next_step=next_step,
                      records=[json.dumps({"step": s}) for s in range(next_step)])


def assert_same_state(a: TrainState, b: TrainState, what: str) -> None:
    """Every tensor bit for bit (names, shapes, dtypes, bits) and every counter."""
    for kind in TENSOR_KINDS:
        ta, tb = a.tensors(kind), b.tensors(kind)
        assert sorted(ta) == sorted(tb), (what, kind)
        for k in ta:
            assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype == np.float32, \
                (what, kind, k)
            assert np.array_equal(ta[k].view(np.uint32), tb[k].view(np.uint32)), (what, kind, k)
    assert (a.adam_step, a.schedule_step, a.next_step) == \
        (b.adam_step, b.schedule_step, b.next_step), what


def leftovers(dst: Path) -> list[str]:
    """Temporary folders a conversion left beside its destination."""
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ----------------------------------------------------------------------------- fast


def test_state_check_names_every_bad_tensor():
    cfg = _cfg()
    s = synthetic_state(cfg)
    s.check("ok")
    bad = dataclasses.replace(s, params=dict(s.params), exp_avg=dict(s.exp_avg),
                              exp_avg_sq=dict(s.exp_avg_sq))
    del bad.params["model.norm.weight"]
    bad.params["model.extra.weight"] = np.zeros(3, np.float32)
    bad.exp_avg["lm_head.weight"] = np.zeros((2, 2), np.float32)
    bad.exp_avg["model.layers.0.mlp.up_proj.weight"] = \
        s.exp_avg["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
    bad.exp_avg_sq["model.layers.1.input_layernorm.weight"] = \
        -np.ones_like(s.exp_avg_sq["model.layers.1.input_layernorm.weight"])
    bad.adam_step = -1
    with pytest.raises(UserError) as e:
        bad.check("here")
    msg = str(e.value)
    for part in ("here:", "params: missing [model.norm.weight]",
                 "params: unexpected [model.extra.weight]", "exp_avg: wrong shapes [lm_head.weight",
                 "not float32: [model.layers.0.mlp.up_proj.weight float16]",
                 "exp_avg_sq: negative entries in [model.layers.1.input_layernorm.weight]",
                 "adam_step=-1"):
        assert part in msg, (part, msg)


def test_state_folder_round_trip(tmp_path):
    s = synthetic_state(_cfg())
    s.source = {"side": "test"}
    back = TrainState.load(s.save(tmp_path / "state"))
    assert_same_state(s, back, "save/load")
    assert back.records == s.records and back.source == s.source
    assert back.config == s.config


@pytest.mark.parametrize("scan", [True, False])
def test_jax_side_round_trip(tmp_path, scan):
    """A state written as a jaxlm run (scanned or unrolled layers) reads back bit for bit;
    the folder is a normal run folder, made in one rename."""
    from parity.convert import read_jax_state, write_jax_run

    s = synthetic_state(_cfg())
    dst = tmp_path / "jax"
    lines: list[str] = []
    write_jax_run(s, dst, [f"train.scan_layers={str(scan).lower()}", "mesh.fsdp=2"],
                  say=lines.append)
    assert len(lines) == 2 and lines[-1].startswith(f"wrote {dst}")
    assert sorted(p.name for p in dst.iterdir()) == [
        "checkpoints", "config.yaml", "conversion.json", "metrics.jsonl"]
    assert oct(dst.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert leftovers(dst) == []
    cfg = load_config(dst / "config.yaml")
    assert cfg.train.out_dir == str(dst.absolute())
    assert (cfg.train.scan_layers, cfg.mesh.fsdp) == (scan, 2)
    assert (dst / "checkpoints" / str(s.next_step) / "checksums.json").is_file()
    assert (dst / "metrics.jsonl").read_text().splitlines() == s.records
    back = read_jax_state(dst)
    assert_same_state(s, back, "jax write/read")
    assert back.records == s.records


def _umask() -> int:
    from lmspec.io import umask

    return umask()


def test_jax_checkpoint_of_another_model_is_refused_naming_tensors(tmp_path):
    from jaxlm.checkpoint import Checkpoints
    from jaxlm.trainstate import check_checkpoint_tensors, one_device_setup
    from parity.convert import read_jax_state, write_jax_run

    dst = write_jax_run(synthetic_state(_cfg()), tmp_path / "jax")
    text = (dst / "config.yaml").read_text()
    (dst / "config.yaml").write_text(text.replace("intermediate_size: 768",
                                                  "intermediate_size: 384"))
    other = load_config(dst / "config.yaml")
    assert other.model.intermediate_size == 384
    with pytest.raises(UserError, match="written with another model.*intermediate_size"):
        read_jax_state(dst)
    ckpts = Checkpoints(dst, 1, read_only=True)
    with pytest.raises(UserError) as e:
        check_checkpoint_tensors(ckpts, 5, one_device_setup(other), other, "ckpt")
    ckpts.close()
    msg = str(e.value)
    assert "params.layers.mlp.up_df (model.layers.*.mlp.up_proj.weight): checkpoint " \
           "(4, 256, 768) float32, config (4, 256, 384) float32" in msg, msg
    assert "opt.1.0.mu.layers.mlp.down_fd (model.layers.*.mlp.down_proj.weight)" in msg


def _fake_ds_run(root: Path, cfg, shapes: dict | None = None, stage: int = 1) -> Path:
    """A DeepSpeed run folder with a model-states file holding only the records that
    :func:`torchlm.trainstate.checkpoint_layout` reads (no worker can load it)."""
    import torch

    from lmspec.config import save_config
    from lmspec.weights import param_shapes

    run = root / "ds"
    tag = run / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000003")
    shapes = shapes if shapes is not None else param_shapes(cfg.model)
    torch.save({"ds_config": {"zero_optimization": {"stage": stage}}, "dp_world_size": 2,
                "param_shapes": [{k: torch.Size(v) for k, v in shapes.items()}]},
               tag / "mp_rank_00_model_states.pt")
    save_config(cfg, run / "config.yaml")
    return run


def test_errors(tmp_path, capsys):
    """Each refusal is one `error:` line, exit status 2, and nothing is written."""
    from lmspec.weights import param_shapes
    from parity.cli import main
    from parity.convert import write_jax_run

    cfg = _cfg()
    jax_run = write_jax_run(synthetic_state(cfg), tmp_path / "jaxrun")
    shapes = dict(param_shapes(cfg.model))
    shapes["model.layers.0.self_attn.q_proj.weight"] = (128, 256)
    del shapes["model.norm.weight"]
    ds_run = _fake_ds_run(tmp_path, cfg, shapes)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((jax_run / "config.yaml").read_text())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["ds-to-jax", jax_run, tmp_path / "o1"], "holds JAX (jaxlm) checkpoints, not "
         "DeepSpeed (torchlm) ones: use `parity convert jax-to-ds`"),
        (["jax-to-ds", ds_run, tmp_path / "o2"], "holds DeepSpeed (torchlm) checkpoints, "
         "not JAX (jaxlm) ones: use `parity convert ds-to-jax`"),
        (["ds-to-jax", empty, tmp_path / "o3"], "no checkpoint in"),
        (["jax-to-ds", tmp_path / "nowhere", tmp_path / "o4"], "no such run folder"),
        (["jax-to-ds", jax_run, busy], "exists and is not empty; a conversion never writes "
         "over a folder"),
        (["jax-to-ds", jax_run, tmp_path / "o5", "model.hidden_size=128"],
         "model cannot change in a conversion"),
        (["jax-to-ds", jax_run, tmp_path / "o6", "train.global_batch_size=16"],
         "train.global_batch_size cannot change"),
        (["ds-to-jax", ds_run, tmp_path / "o7", "mesh.tensor=3"], "is not divisible by mesh "
         "axis tensor=3"),
        (["ds-to-jax", ds_run, tmp_path / "o8", "--step", "7"], "no checkpoint step00000007"),
        (["jax-to-ds", jax_run, tmp_path / "o9", "--step", "2"],
         "no complete checkpoint for step 2"),
        (["ds-to-jax", ds_run, tmp_path / "o10"], "its parameters do not fit the model of "
         "config.yaml: parameters: missing [model.norm.weight]; parameters: wrong shapes "
         "[model.layers.0.self_attn.q_proj.weight (128, 256) != (256, 256)]"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(["convert", *map(str, argv)])
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        assert err.startswith("error: ") and expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no temp
    assert (busy / "keep.txt").read_text() == "mine"


def test_layout_of_another_stage_or_world_is_refused(tmp_path):
    from parity.convert import read_ds_state

    cfg = _cfg()
    run = _fake_ds_run(tmp_path, cfg, stage=3)
    with pytest.raises(UserError, match=r"ZeRO stage 3, config.yaml zero.stage=1"):
        read_ds_state(run)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A failure after files were written (here: the checkpoint saved, then an error)
    removes the temporary folder; the destination never appears."""
    import jaxlm.trainstate as jts
    from parity.convert import write_jax_run

    real = jts.write_checkpoint

    def broken(state, out_dir):
        real(state, out_dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jts, "write_checkpoint", broken)
    dst = tmp_path / "jax"
    with pytest.raises(OSError, match="No space left"):
        write_jax_run(synthetic_state(_cfg()), dst)
    assert not dst.exists() and leftovers(dst) == []


# ----------------------------------------------------------------------------- slow


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *map(str, cmd)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    print(f"{' '.join(map(str, cmd[:3]))}: {time.perf_counter() - t0:.1f}s")  # noqa: T201
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _records(run: Path) -> list[dict]:
    from lmspec.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl")


def _ds_train(out: Path, steps: int, *extra: str) -> Path:
    _run(["torchlm.cli", "train", TINY, *DS_ARGS, f"train.steps={steps}",
          f"train.out_dir={out}", "--no-progress", *extra])
    return out


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """DeepSpeed fp32 runs of TRAIN_STEPS steps, ZeRO-1 and ZeRO-3, 2 ranks (each in its
    own folder: DeepSpeed's universal converter writes beside its output)."""
    root = tmp_path_factory.mktemp("convert_ds")
    return {stage: _ds_train(root / f"z{stage}" / "run", TRAIN_STEPS, f"zero.stage={stage}")
            for stage in (1, 3)}


def _universal(run: Path, tag: str) -> tuple[dict[str, dict[str, np.ndarray]], set[float]]:
    """fp32 weights and both moments of every parameter, and the Adam step counts, by
    DeepSpeed's universal-checkpoint converter (an offline reader independent of the
    engine). The step is per parameter (``step.pt``) after ZeRO 1/2, in the common
    optimizer state after ZeRO 3."""
    import torch

    out = run.parent / "universal" / tag
    _run(["deepspeed.checkpoint.ds_to_universal", "--input_folder",
          run / "checkpoints" / tag, "--output_folder", out, "--num_extract_workers", "1",
          "--num_merge_workers", "1", "--inject_missing_state"])
    got: dict[str, dict[str, np.ndarray]] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    steps: set[float] = set()
    for d in sorted((out / "zero").iterdir()):
        if not d.is_dir():  # optimizer_state.pt: settings and, after ZeRO 3, the steps
            common = torch.load(d, weights_only=False).get("optimizer_state_dict") or {}
            steps |= {float(st["step"]) for st in common.get("state", {}).values()}
            continue
        for kind, file in (("params", "fp32"), ("exp_avg", "exp_avg"),
                           ("exp_avg_sq", "exp_avg_sq")):
            v = torch.load(d / f"{file}.pt", weights_only=False)
            v = v["param"] if isinstance(v, dict) else v  # ZeRO 3: the tensor alone
            got[kind][d.name] = v.detach().to(torch.float32).numpy()
        if (d / "step.pt").is_file():
            steps.add(float(torch.load(d / "step.pt", weights_only=False)))
    return got, steps


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 3])
def test_ds_to_jax_and_back_bitwise(ds_runs, tmp_path, stage):
    """DeepSpeed -> JAX -> DeepSpeed, every tensor and counter bit for bit; what the
    engine read agrees with DeepSpeed's offline readers and torchlm's own weights."""
    from lmspec.weights import load_safetensors
    from parity.convert import read_ds_state, read_jax_state
    from torchlm.export import checkpoint_weights

    src = ds_runs[stage]
    tag = f"step{TRAIN_STEPS:08d}"
    t0 = time.perf_counter()
    state = read_ds_state(src, work_dir=tmp_path)
    print(f"read_ds_state ZeRO-{stage}: {time.perf_counter() - t0:.1f}s")  # noqa: T201
    assert (state.adam_step, state.schedule_step, state.next_step) == (TRAIN_STEPS,) * 3
    assert [json.loads(r)["step"] for r in state.records] == list(range(TRAIN_STEPS))
    # independent readers: torchlm's end-of-run weights, zero_to_fp32, the universal
    # checkpoint converter (weights, both moments, the step)
    final = load_safetensors(src / "model.safetensors")
    offline = checkpoint_weights(src, tag)
    universal, steps = _universal(src, tag)
    for k, v in state.params.items():
        assert np.array_equal(v, final[k]) and np.array_equal(v, offline[k]), k
        # the universal files of ZeRO 3 hold flat tensors: compare the elements
        for kind in TENSOR_KINDS:
            assert np.array_equal(state.tensors(kind)[k].reshape(-1),
                                  universal[kind][k].reshape(-1)), (kind, k)
    assert sorted(universal["params"]) == sorted(state.params)
    assert steps == {float(TRAIN_STEPS)}
    # to JAX through the command line, and back into another folder
    jax_dir, back_dir = tmp_path / "jax", tmp_path / "back"
    proc = _run(["parity.cli", "convert", "ds-to-jax", src, jax_dir])
    assert proc.stdout.count("[parity convert]") == 4, proc.stdout
    assert_same_state(state, read_jax_state(jax_dir), f"ZeRO-{stage} -> JAX")
    _run(["parity.cli", "convert", "jax-to-ds", jax_dir, back_dir])
    back = read_ds_state(back_dir, work_dir=tmp_path)
    assert_same_state(state, back, f"ZeRO-{stage} -> JAX -> ZeRO-{stage}")
    assert back.records == state.records
    record = json.loads((back_dir / "conversion.json").read_text())
    assert record["source"]["side"] == "jax" and record["next_step"] == TRAIN_STEPS


@pytest.mark.slow
@pytest.mark.multiprocess
def test_converted_runs_resume(ds_runs, tmp_path):
    """ZeRO-1 (2 ranks) -> JAX, `jaxlm train` continues; -> ZeRO-3 on 1 rank,
    `torchlm train` continues. Each resumes at the step the state says, with the LR of
    that step and lmspec's batch of that step, its history kept."""
    from lmspec.data import Dataset, batch_fingerprint
    from lmspec.schedule import lr_at
    from parity.convert import ds_to_jax, jax_to_ds, read_ds_state, read_jax_state

    cfg = _cfg()
    data = Dataset.from_config(cfg, progress=False)
    src = ds_runs[1]
    jax_dir, ds_dir = tmp_path / "jax", tmp_path / "ds"
    t0 = time.perf_counter()
    ds_to_jax(src, jax_dir, ["mesh.fsdp=2"])
    print(f"ds_to_jax tiny ZeRO-1 x2: {time.perf_counter() - t0:.1f}s")  # noqa: T201
    _run(["jaxlm.cli", "train", jax_dir / "config.yaml", f"train.steps={JAX_STEPS}",
          "--no-progress"])
    jax_records = _records(jax_dir)
    ds_records = _records(src)
    assert [r["step"] for r in jax_records] == list(range(JAX_STEPS))
    assert jax_records[:TRAIN_STEPS] == ds_records  # the history, kept
    summary = json.loads((jax_dir / "run_summary.json").read_text())
    assert summary["start_step"] == TRAIN_STEPS and summary["side"] == "jax"
    for r in jax_records[TRAIN_STEPS:]:
        assert r["lr"] == float(np.float32(lr_at(r["step"], cfg.optim))), r
        assert r["batch_fingerprint"] == batch_fingerprint(data.global_batch(r["step"]))
    t0 = time.perf_counter()
    jax_to_ds(jax_dir, ds_dir, ["zero.stage=3", "zero.world_size=1",
                                "train.micro_batch_size=4"])
    print(f"jax_to_ds tiny -> ZeRO-3 x1: {time.perf_counter() - t0:.1f}s")  # noqa: T201
    assert_same_state(read_jax_state(jax_dir), read_ds_state(ds_dir, work_dir=tmp_path),
                      "JAX -> ZeRO-3 x1")
    _run(["torchlm.cli", "train", ds_dir / "config.yaml", f"train.steps={BACK_STEPS}",
          "--no-progress"])
    back = _records(ds_dir)
    assert [r["step"] for r in back] == list(range(BACK_STEPS))
    assert back[:JAX_STEPS] == jax_records
    summary = json.loads((ds_dir / "run_summary.json").read_text())
    assert summary["resumed_from_step"] == JAX_STEPS and summary["zero_stage"] == 3
    for r in back[JAX_STEPS:]:
        assert r["lr"] == lr_at(r["step"], cfg.optim), r
        assert r["batch_fingerprint"] == batch_fingerprint(data.global_batch(r["step"]))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_state_between_zero_stages(tmp_path):
    """bf16 masters and moments out of DeepSpeed's BF16_Optimizer (ZeRO-1), into ZeRO-0's
    FP16_UnfusedOptimizer on 1 rank and back, bit for bit; the run resumes."""
    from parity.convert import read_ds_state, write_ds_run

    src = _ds_train(tmp_path / "bf16", 3, "train.precision=bf16", "zero.stage=1")
    state = read_ds_state(src, work_dir=tmp_path)
    z0 = write_ds_run(state, tmp_path / "z0", ["zero.stage=0", "zero.world_size=1",
                                                "train.micro_batch_size=4"])
    back = read_ds_state(z0, work_dir=tmp_path)
    assert_same_state(state, back, "bf16 ZeRO-1 x2 -> ZeRO-0 x1")
    _run(["torchlm.cli", "train", z0 / "config.yaml", "train.steps=4", "--no-progress"])
    assert [r["step"] for r in _records(z0)] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_optimizer_not_the_configs_is_refused(ds_runs, tmp_path):
    """A checkpoint whose AdamW settings differ from config.yaml (here: beta2 edited in
    config.yaml) is refused naming the setting, by the worker that loaded it."""
    import shutil

    from parity.convert import read_ds_state

    run = tmp_path / "run"
    shutil.copytree(ds_runs[1], run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("beta2: 0.95", "beta2: 0.999"))
    with pytest.raises(UserError) as e:
        read_ds_state(run, work_dir=tmp_path)
    assert "its optimizer is not the AdamW of config.yaml" in str(e.value)
    assert "param group 'decay' betas=(0.9, 0.95), config: optim.beta1/beta2 = (0.9, 0.999)" \
        in str(e.value)

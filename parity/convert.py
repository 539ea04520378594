"""Move a run's whole train state from DeepSpeed to JAX and back (``parity convert``).

The state in between is the framework-neutral :class:`lmspec.trainstate.TrainState` (fp32
master weights and AdamW moments under Hugging Face names, the Adam step, the schedule
position, the next data step, the config and the run's metrics records), so a caller can
read a state, change it, and write it (``read_ds_state`` / ``read_jax_state``,
``write_jax_run`` / ``write_ds_run``); ``ds_to_jax`` and ``jax_to_ds`` do both.

Each side is read and written by its own trainer's machinery: the DeepSpeed side through
DeepSpeed engines on ``zero.world_size`` torchrun workers (:mod:`torchlm.trainstate`),
the JAX side through jaxlm's Orbax checkpoints (:mod:`jaxlm.trainstate`). The result is
a normal run folder (``config.yaml`` with ``train.out_dir`` pointing at it, the
checkpoint, ``metrics.jsonl`` of the steps done, and ``conversion.json`` saying where it
came from) that ``jaxlm train`` / ``torchlm train`` resumes with no extra flag.

Nothing is written at the destination until the conversion has succeeded: the run folder
is assembled in a temporary folder beside it and renamed at the end (removed on failure);
a destination that exists and is not empty is refused, never written over.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmspec.config import ExperimentConfig, from_dict, load_config, parse_override, save_config
from lmspec.errors import UserError
from lmspec.io import atomic_write_json
from lmspec.runs import checkpoint_kinds
from lmspec.trainstate import TrainState, records_before, write_records

Say = Callable[[str], None]
CONVERSION_RECORD = "conversion.json"
SIDE_NAMES = {"torch": "DeepSpeed (torchlm)", "jax": "JAX (jaxlm)"}
# overrides that would change what the state means (its tensors, its data position, its
# optimizer): refused; the destination folder is the command's argument
FROZEN_OVERRIDES = ("model", "optim", "data", "train.global_batch_size", "train.seed",
                    "train.out_dir")


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- checks


def check_source(run_dir: str | os.PathLike, side: str) -> Path:
    """``run_dir`` is a run folder of ``side`` (``torch`` or ``jax``) with a config.yaml
    and a checkpoint; a UserError saying what it is instead."""
    run_dir = Path(run_dir)
    other = "jax" if side == "torch" else "torch"
    command = "jax-to-ds" if side == "jax" else "ds-to-jax"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    kinds = checkpoint_kinds(run_dir)
    if side not in kinds and other in kinds:
        flip = "ds-to-jax" if other == "torch" else "jax-to-ds"
        raise UserError(f"{run_dir} holds {SIDE_NAMES[other]} checkpoints, not "
                        f"{SIDE_NAMES[side]} ones: use `parity convert {flip}`")
    if side not in kinds:
        raise UserError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} (train "
                        f"it first, with train.ckpt_every or to its end); `parity convert "
                        f"{command}` converts a {SIDE_NAMES[side]} run folder")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml (every run folder of "
                        f"{'torchlm' if side == 'torch' else 'jaxlm'} train has one)")
    return run_dir


def check_destination(dst: str | os.PathLike) -> Path:
    """``dst`` does not exist, or is an empty folder, and its parent can hold it."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} exists and is not empty; a conversion never writes over "
                        "a folder: choose a new destination")
    parent = dst.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{dst}: cannot create {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"{dst}: {parent} is not writable")
    return dst


def target_config(cfg: ExperimentConfig, dst: str | os.PathLike,
                  overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The converted run's config: the source's, with ``overrides`` (``zero.*``,
    ``mesh.*``, ``train.steps``, ...) applied and validated, and ``train.out_dir`` the
    destination. Overrides that change the state's meaning are refused."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        for frozen in FROZEN_OVERRIDES:
            if key == frozen or key.startswith(frozen + "."):
                what = ("the destination is the command's argument" if frozen ==
                        "train.out_dir" else "it would change what the converted state "
                        "means (model, optimizer, data or batch)")
                raise UserError(f"override {text!r}: {frozen} cannot change in a "
                                f"conversion; {what}")
    return from_dict(cfg.to_dict(), [*overrides, f"train.out_dir={Path(dst).absolute()}"])


@contextmanager
def _staging(dst: Path, purpose: str) -> Iterator[Path]:
    """A temporary folder beside ``dst`` (same file system), removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{purpose}-", dir=dst.absolute().parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(tmp: Path, dst: Path) -> None:
    """Rename the assembled folder onto ``dst`` (which must not have appeared meanwhile)."""
    from lmspec.io import umask

    os.chmod(tmp, 0o777 & ~umask())  # a run folder's usual mode, not mkdtemp's 0700
    try:
        os.replace(tmp, dst)  # replaces an empty folder; fails on a non-empty one
    except OSError as e:
        raise UserError(f"{dst}: cannot put the converted run there ({e.strerror or e}); "
                        "did something write into it during the conversion?") from None


def _common_files(state: TrainState, folder: Path, side: str,
                  extra: dict[str, Any]) -> None:
    """``config.yaml``, ``metrics.jsonl`` and ``conversion.json`` of a converted run."""
    save_config(state.config, folder / "config.yaml")
    if state.records:
        write_records(state.records, folder / "metrics.jsonl")
    atomic_write_json(folder / CONVERSION_RECORD, {
        "to": side, "source": state.source, "adam_step": state.adam_step,
        "schedule_step": state.schedule_step, "next_step": state.next_step,
        "tensors": len(state.params), **extra})


def _summary(state: TrainState) -> str:
    n = len(state.params)
    return (f"{n} tensors x 3 (params, exp_avg, exp_avg_sq), Adam step {state.adam_step}, "
            f"schedule step {state.schedule_step}, next data step {state.next_step}")


# ----------------------------------------------------------------------------- DeepSpeed


def ds_tag(run_dir: Path, step: int | None) -> str:
    """The DeepSpeed checkpoint tag to read: ``step`` or the run's ``latest``."""
    from torchlm.runfolder import CKPT_SUBDIR, checkpoint_tag, checkpoint_tags, latest_checkpoint

    tags = checkpoint_tags(run_dir)
    tag = checkpoint_tag(step) if step is not None else latest_checkpoint(run_dir)
    if tag is None or tag not in tags:
        what = f"step {step}" if step is not None else "latest"
        raise UserError(f"{run_dir}: no checkpoint {tag or what} in {run_dir / CKPT_SUBDIR} "
                        f"(there are {tags or 'none'})")
    return tag


def read_ds_state(run_dir: str | os.PathLike, *, step: int | None = None,
                  work_dir: str | os.PathLike | None = None, say: Say | None = None
                  ) -> TrainState:
    """The train state of a ``torchlm train`` run folder: checkpoint ``step`` (default:
    ``latest``), verified against its checksums, read by DeepSpeed engines on the run's
    ``zero.world_size`` workers (:mod:`torchlm.trainstate`); with the run's config and
    its metrics records before the next step. ``work_dir`` (default: a system temporary
    folder) holds the workers' output while they run."""
    from torchlm.runfolder import CKPT_SUBDIR, verify_checkpoint
    from torchlm.trainstate import read_state

    say = say or _quiet
    run_dir = check_source(run_dir, "torch")
    tag = ds_tag(run_dir, step)
    cfg = load_config(run_dir / "config.yaml")
    t0 = time.perf_counter()
    verify_checkpoint(run_dir, tag, say=say)
    say(f"reading {run_dir / CKPT_SUBDIR / tag} (ZeRO-{cfg.zero.stage}, "
        f"{cfg.train.precision}) with DeepSpeed engines on {cfg.zero.world_size} rank(s)")
    with tempfile.TemporaryDirectory(prefix="parity-convert-", dir=work_dir) as work:
        state = read_state(run_dir, tag, work)
    state.config = cfg
    state.records = records_before(run_dir / "metrics.jsonl", state.next_step)
    state.source = {"side": "torch", "run_dir": str(run_dir.absolute()), "checkpoint": tag,
                    "zero_stage": cfg.zero.stage, "world_size": cfg.zero.world_size,
                    "read_s": round(time.perf_counter() - t0, 3)}
    state.check(str(run_dir / CKPT_SUBDIR / tag))
    say(f"read {_summary(state)} in {state.source['read_s']:.1f}s")
    return state


def write_ds_run(state: TrainState, dst: str | os.PathLike, overrides: Sequence[str] = (),
                 *, say: Say | None = None) -> Path:
    """Write ``state`` as a ``torchlm train`` run folder ``dst`` (must not exist, or be
    empty) that resumes at ``state.next_step``: its config is ``state.config`` with
    ``overrides`` (e.g. ``zero.stage=3``, ``zero.world_size=4``) and ``train.out_dir``
    set to ``dst``; DeepSpeed engines on that many workers save the checkpoint. Every
    tensor is checked first and read back from the engines before they save."""
    from torchlm.trainstate import write_checkpoint

    say = say or _quiet
    dst = check_destination(dst)
    cfg = target_config(state.config, dst, overrides)
    state = dataclasses.replace(state, config=cfg)
    state.check("the state to write")
    t0 = time.perf_counter()
    say(f"writing the DeepSpeed checkpoint (ZeRO-{cfg.zero.stage}, {cfg.train.precision}, "
        f"{cfg.zero.world_size} rank(s)) of step {state.next_step}")
    with _staging(dst, "convert") as tmp, _staging(dst, "convert-work") as work:
        write_checkpoint(state, tmp, work)
        _common_files(state, tmp, "torch", {
            "zero_stage": cfg.zero.stage, "world_size": cfg.zero.world_size,
            "write_s": round(time.perf_counter() - t0, 3)})
        _finish(tmp, dst)
    say(f"wrote {dst} in {time.perf_counter() - t0:.1f}s; continue it with: "
        f"torchlm train {dst / 'config.yaml'} train.steps=N")
    return dst


# ----------------------------------------------------------------------------- JAX


def read_jax_state(run_dir: str | os.PathLike, *, step: int | None = None,
                   say: Say | None = None) -> TrainState:
    """The train state of a ``jaxlm train`` run folder: checkpoint ``step`` (default: the
    newest complete one), verified against its checksums and checked array by array,
    restored on one CPU device (:mod:`jaxlm.trainstate`); with the run's config and its
    metrics records before the next step."""
    from jaxlm.trainstate import read_state

    say = say or _quiet
    run_dir = check_source(run_dir, "jax")
    t0 = time.perf_counter()
    say(f"reading the newest jaxlm checkpoint of {run_dir}" if step is None else
        f"reading jaxlm checkpoint {step} of {run_dir}")
    state = read_state(run_dir, step, say=say)
    where = state.source.get("checkpoint", str(run_dir))
    state.records = records_before(run_dir / "metrics.jsonl", state.next_step)
    state.source = {"side": "jax", "run_dir": str(run_dir.absolute()), "checkpoint": where,
                    "read_s": round(time.perf_counter() - t0, 3)}
    state.check(where)
    say(f"read {_summary(state)} in {state.source['read_s']:.1f}s")
    return state


def write_jax_run(state: TrainState, dst: str | os.PathLike, overrides: Sequence[str] = (),
                  *, say: Say | None = None) -> Path:
    """Write ``state`` as a ``jaxlm train`` run folder ``dst`` (must not exist, or be
    empty) that resumes at ``state.next_step``: its config is ``state.config`` with
    ``overrides`` (e.g. ``mesh.fsdp=4``, ``train.scan_layers=false``) and
    ``train.out_dir`` set to ``dst``; the Orbax checkpoint is the one ``jaxlm train``
    saves, restorable on any mesh (checked: every axis given as a number divides what
    it shards)."""
    from jaxlm.trainstate import check_mesh, write_checkpoint

    say = say or _quiet
    dst = check_destination(dst)
    cfg = target_config(state.config, dst, overrides)
    check_mesh(cfg)
    state = dataclasses.replace(state, config=cfg)
    state.check("the state to write")
    t0 = time.perf_counter()
    m = cfg.mesh
    say(f"writing the jaxlm checkpoint of step {state.next_step} (mesh data={m.data} "
        f"fsdp={m.fsdp} tensor={m.tensor}, scan_layers={cfg.train.scan_layers})")
    with _staging(dst, "convert") as tmp:
        write_checkpoint(state, tmp)
        _common_files(state, tmp, "jax", {"write_s": round(time.perf_counter() - t0, 3)})
        _finish(tmp, dst)
    say(f"wrote {dst} in {time.perf_counter() - t0:.1f}s; continue it with: "
        f"jaxlm train {dst / 'config.yaml'} train.steps=N")
    return dst


# ----------------------------------------------------------------------------- both ways


def ds_to_jax(src: str | os.PathLike, dst: str | os.PathLike, overrides: Sequence[str] = (),
              *, step: int | None = None, say: Say | None = None) -> Path:
    """Convert the ``torchlm train`` run ``src`` into the ``jaxlm train`` run ``dst``
    (:func:`read_ds_state` then :func:`write_jax_run`); the destination and the
    overrides are checked before anything is read."""
    src, dst = check_source(src, "torch"), check_destination(dst)
    cfg = target_config(load_config(Path(src) / "config.yaml"), dst, overrides)
    from jaxlm.trainstate import check_mesh

    check_mesh(cfg)
    with _staging(dst, "convert-work") as work:
        state = read_ds_state(src, step=step, work_dir=work, say=say)
    return write_jax_run(state, dst, overrides, say=say)


def jax_to_ds(src: str | os.PathLike, dst: str | os.PathLike, overrides: Sequence[str] = (),
              *, step: int | None = None, say: Say | None = None) -> Path:
    """Convert the ``jaxlm train`` run ``src`` into the ``torchlm train`` run ``dst``
    (:func:`read_jax_state` then :func:`write_ds_run`); the destination and the
    overrides are checked before anything is read."""
    src, dst = check_source(src, "jax"), check_destination(dst)
    target_config(load_config(Path(src) / "config.yaml"), dst, overrides)
    state = read_jax_state(src, step=step, say=say)
    return write_ds_run(state, dst, overrides, say=say)

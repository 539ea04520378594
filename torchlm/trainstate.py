"""A DeepSpeed checkpoint of ``torchlm train`` <-> the framework-neutral
:class:`lmspec.trainstate.TrainState`, through DeepSpeed's own engine.

Reading and writing both run ``zero.world_size`` workers under torchrun
(:mod:`torchlm.launch`, module :mod:`torchlm.state_worker`), each building the engine of
the run's config exactly as ``torchlm train`` does (:func:`torchlm.trainer.build_engine`),
so any ZeRO stage (0-3), precision and world size is handled by DeepSpeed itself:

- read: ``engine.load_checkpoint`` (DeepSpeed's reader: it re-partitions nothing, the
  world size is the checkpoint's), then ``safe_get_full_fp32_param`` and
  ``safe_get_full_optimizer_state`` (:mod:`torchlm.gather`) assemble the fp32 masters and
  AdamW moments on every rank; the Adam step is torch AdamW's ``state["step"]``, the
  schedule position ``LambdaLR.last_epoch``, the next data step the checkpoint's
  ``client_state["step"]``. Rank 0 writes the state folder.
- write: the engine of the target config and world size, built from the converted
  weights; ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` set masters
  and moments, the AdamW state gets the update count, the scheduler is stepped to its
  position, every value is read back and compared bit for bit, then
  ``engine.save_checkpoint`` writes tag ``step<next_step>`` with ``client_state`` like a
  training run, and rank 0 its ``checksums.json``.

Before any worker starts, :func:`checkpoint_layout` reads the ZeRO stage, world size and
parameter shapes DeepSpeed recorded in its model-states file (the ``param_shapes`` that
``deepspeed.utils.zero_to_fp32`` reads, or the module state dict under ZeRO 0), so a
checkpoint of another model is refused naming its tensors, without loading it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmspec.config import ExperimentConfig, load_config
from lmspec.errors import UserError
from lmspec.trainstate import TrainState, tensor_problems
from torchlm.runfolder import CKPT_SUBDIR, checkpoint_tag, save_engine_checkpoint

WORKER = "torchlm.state_worker"
ERROR_PREFIX = "user-error.rank"


@dataclass(frozen=True)
class CheckpointLayout:
    """What DeepSpeed recorded about a checkpoint's layout."""

    stage: int
    world_size: int
    shapes: dict[str, tuple[int, ...]]


def checkpoint_layout(folder: str | os.PathLike) -> CheckpointLayout:
    """ZeRO stage, data-parallel world size and parameter shapes of the DeepSpeed
    checkpoint ``folder`` (one tag), from its first model-states file (memory-mapped:
    only the small records are read)."""
    import torch

    folder = Path(folder)
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{folder}: no DeepSpeed model-states file (*model_states.pt); "
                        "not a DeepSpeed checkpoint, or an incomplete one")
    try:
        sd = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{files[0]}: cannot be read ({first})") from e
    ds = sd.get("ds_config") or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    shapes: dict[str, tuple[int, ...]] = {}
    for group in sd.get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    if not shapes:  # ZeRO 0: the module holds every parameter
        shapes = {k: tuple(v.shape) for k, v in (sd.get("module") or {}).items()}
    return CheckpointLayout(stage=stage, world_size=int(sd.get("dp_world_size", 1)),
                            shapes=shapes)


def check_layout(layout: CheckpointLayout, cfg: ExperimentConfig, where: str) -> None:
    """The checkpoint's stage, world size and tensors against the run's config."""
    problems = []
    if layout.stage != cfg.zero.stage:
        problems.append(f"ZeRO stage {layout.stage}, config.yaml zero.stage={cfg.zero.stage}")
    if layout.world_size != cfg.zero.world_size:
        problems.append(f"{layout.world_size} ranks, config.yaml "
                        f"zero.world_size={cfg.zero.world_size}")
    if problems:
        raise UserError(f"{where}: written with another layout than its run's config.yaml "
                        f"says ({'; '.join(problems)}); fix config.yaml to match it")
    bad = tensor_problems(cfg, {k: _Shape(v) for k, v in layout.shapes.items()},
                          "parameters")
    if bad:
        raise UserError(f"{where}: its parameters do not fit the model of config.yaml: "
                        + "; ".join(bad))


class _Shape:
    """A stand-in with a shape (and fp32 dtype) for a tensor that is not read."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


# ----------------------------------------------------------------------------- parent


def _launch(cfg: ExperimentConfig, args: Sequence[str], error_dir: Path) -> None:
    """Run the state workers; a user error a worker raised comes back as a UserError.
    (No parent-death signal: the caller may run JAX's threads; see ``launch``.)"""
    from torchlm.launch import WorkerError, launch

    try:
        launch(cfg, [str(a) for a in args], module=WORKER, die_with_parent=False)
    except WorkerError:
        files = sorted(error_dir.glob(ERROR_PREFIX + "*"),
                       key=lambda p: int(p.name.removeprefix(ERROR_PREFIX) or 0))
        if files:
            raise UserError(files[0].read_text().strip()) from None
        raise


def read_state(run_dir: str | os.PathLike, tag: str, work_dir: str | os.PathLike
               ) -> TrainState:
    """The train state of checkpoint ``tag`` of the ``torchlm train`` run in ``run_dir``
    (its ``config.yaml`` gives model, stage and world size), read by DeepSpeed engines on
    ``zero.world_size`` workers; ``work_dir`` holds the state folder they write.
    ``records`` and ``source`` are left for the caller."""
    run_dir, work = Path(run_dir), Path(work_dir)
    cfg = load_config(run_dir / "config.yaml")
    folder = run_dir / CKPT_SUBDIR / tag
    check_layout(checkpoint_layout(folder), cfg, str(folder))
    out = work / "state"
    _launch(cfg, ["read", "--run-dir", run_dir, "--tag", tag, "--out", out,
                  "--error-dir", work], work)
    return TrainState.load(out)


def write_checkpoint(state: TrainState, out_dir: str | os.PathLike,
                     work_dir: str | os.PathLike) -> Path:
    """Write ``state`` as DeepSpeed checkpoint ``step<next_step>`` of a ``torchlm train``
    run in ``out_dir`` (``state.config`` is that run's config: stage, world size),
    through ``state.config.zero.world_size`` workers; returns the tag folder."""
    work = Path(work_dir)
    folder = state.save(work / "state")
    _launch(state.config, ["write", "--state", folder, "--out-dir", out_dir,
                           "--error-dir", work], work)
    return Path(out_dir) / CKPT_SUBDIR / checkpoint_tag(state.next_step)


# ----------------------------------------------------------------------------- workers


def _optimizer_problems(torch_optimizer, cfg: ExperimentConfig, schedule_step: int
                        ) -> list[str]:
    """The torch AdamW's settings against the config (after ``load_checkpoint``, which
    restores the checkpoint's param-group settings)."""
    from lmspec.schedule import lr_at

    o = cfg.optim
    want_lr = lr_at(schedule_step, o)
    out = []
    for i, g in enumerate(torch_optimizer.param_groups):
        name = g.get("name", f"#{i}")
        wd = o.weight_decay if name == "decay" else 0.0
        checks = [("betas", tuple(g.get("betas", ())), (o.beta1, o.beta2),
                   "optim.beta1/beta2"),
                  ("eps", g.get("eps"), o.eps, "optim.eps"),
                  ("weight_decay", g.get("weight_decay"), wd, "optim.weight_decay"),
                  ("amsgrad", bool(g.get("amsgrad")), False, "AdamW without amsgrad"),
                  ("maximize", bool(g.get("maximize")), False, "minimising"),
                  ("lr", g.get("lr"), want_lr, f"lr_at({schedule_step}) of the optim section")]
        for key, have, want, what in checks:
            if have != want:
                out.append(f"param group {name!r} {key}={have!r}, config: {what} = {want!r}")
    for st in torch_optimizer.state.values():
        keys = set(st)
        if keys != {"step", "exp_avg", "exp_avg_sq"}:
            out.append(f"optimizer state keys {sorted(keys)}, AdamW's are "
                       "['exp_avg', 'exp_avg_sq', 'step']")
            break
    return out


def _all_equal(values: list[float], device) -> float:
    """The one value every entry on every rank holds; a UserError otherwise."""
    import torch
    import torch.distributed as dist

    lo = torch.tensor([min(values) if values else 0.0], dtype=torch.float64, device=device)
    hi = torch.tensor([max(values) if values else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise UserError(f"the AdamW step counts differ between tensors ({lo.item():g} to "
                        f"{hi.item():g}); a state with one count per run is needed")
    return float(lo.item())


def _read_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from torchlm.ds_config import model_attention
    from torchlm.gather import (
        ADAM_MOMENTS,
        full_optimizer_state,
        full_params,
        init_optimizer_state,
        link_optimizer_state,
        optimizer_steps,
    )
    from torchlm.model import Llama
    from torchlm.trainer import build_engine, worker_device

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    where = str(run_dir / CKPT_SUBDIR / args.tag)
    world = dist.get_world_size()
    device = worker_device(world)
    engine, topt = build_engine(cfg, Llama(cfg.model, attention=model_attention(cfg)),
                                device, world)
    path, client = engine.load_checkpoint(str(run_dir / CKPT_SUBDIR), tag=args.tag,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{where}: DeepSpeed could not load it")
    if not isinstance(client, dict) or not isinstance(client.get("step"), int):
        raise UserError(f"{where}: no client_state step (the next data step): not a "
                        "checkpoint of torchlm train")
    if not topt.state:  # saved before the first update: what AdamW's first step creates
        init_optimizer_state(engine, topt, 0)
    else:
        link_optimizer_state(engine)
    schedule_step = int(engine.lr_scheduler.last_epoch)
    problems = _optimizer_problems(topt, cfg, schedule_step)
    if problems:
        raise UserError(f"{where}: its optimizer is not the AdamW of config.yaml: "
                        + "; ".join(problems))
    adam_step = _all_equal(optimizer_steps(engine, topt), device)
    tensors = {"params": full_params(engine)}
    for key in ADAM_MOMENTS:
        tensors[key] = full_optimizer_state(engine, topt, key)
    if dist.get_rank() == 0:
        state = TrainState(config=cfg, adam_step=int(adam_step), schedule_step=schedule_step,
                           next_step=int(client["step"]), **tensors)
        state.check(where)
        state.save(args.out)
    dist.barrier()


def _write_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from torchlm.ds_config import model_attention
    from torchlm.gather import (
        ADAM_MOMENTS,
        init_optimizer_state,
        set_master_params,
        set_optimizer_state,
    )
    from torchlm.model import Llama
    from torchlm.trainer import build_engine, worker_device
    from torchlm.weights import load_numpy

    state = TrainState.load(args.state)
    cfg = state.config
    world = dist.get_world_size()
    device = worker_device(world)
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model, attention=model_attention(cfg))
    load_numpy(model, state.params, where="the converted state")  # the working copy
    engine, topt = build_engine(cfg, model, device, world)
    set_master_params(engine, state.params)
    init_optimizer_state(engine, topt, state.adam_step)
    for key in ADAM_MOMENTS:
        set_optimizer_state(engine, topt, key, state.tensors(key))
    scheduler = engine.lr_scheduler
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state.schedule_step):
            scheduler.step()
    # DeepSpeed's own counters, as a run that took these steps leaves them
    engine.global_steps = state.next_step
    engine.global_samples = state.next_step * cfg.train.global_batch_size
    engine.skipped_steps = max(0, state.next_step - state.adam_step)
    _check_written(engine, topt, state, device)
    ckpt = Path(args.out_dir) / CKPT_SUBDIR
    save_engine_checkpoint(engine, ckpt, state.next_step)


def _check_written(engine, topt, state: TrainState, device) -> None:
    """Read everything back from the engine and compare bit for bit (an internal
    invariant: a failure here is a bug, not the user's)."""
    from lmspec.schedule import lr_at
    from torchlm.gather import full_optimizer_state, full_params, optimizer_steps

    got = {"params": full_params(engine)}
    for key in ("exp_avg", "exp_avg_sq"):
        got[key] = full_optimizer_state(engine, topt, key)
    for kind, tensors in got.items():
        want = state.tensors(kind)
        bad = [k for k in want if not np.array_equal(tensors[k].view(np.uint32),
                                                     np.asarray(want[k]).view(np.uint32))]
        if bad:
            raise RuntimeError(f"{kind} read back from the DeepSpeed engine differs from "
                               f"what was set: {bad[:5]}")
    steps = _all_equal(optimizer_steps(engine, topt), device)
    lr = [g["lr"] for g in topt.param_groups]
    want_lr = lr_at(state.schedule_step, state.config.optim)
    if steps != state.adam_step or any(v != want_lr for v in lr) \
            or engine.lr_scheduler.last_epoch != state.schedule_step:
        raise RuntimeError(f"engine counters after setting: adam step {steps} (want "
                           f"{state.adam_step}), lr {lr} (want {want_lr}), schedule step "
                           f"{engine.lr_scheduler.last_epoch} (want {state.schedule_step})")


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry: ``read`` or ``write`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=WORKER, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rd = sub.add_parser("read")
    rd.add_argument("--run-dir", required=True)
    rd.add_argument("--tag", required=True)
    rd.add_argument("--out", required=True)
    rd.add_argument("--error-dir", required=True)
    wr = sub.add_parser("write")
    wr.add_argument("--state", required=True)
    wr.add_argument("--out-dir", required=True)
    wr.add_argument("--error-dir", required=True)
    args = parser.parse_args(argv)
    from torchlm.trainer import init_process_group

    init_process_group()
    import torch.distributed as dist

    try:
        (_read_worker if args.mode == "read" else _write_worker)(args)
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        Path(args.error_dir, f"{ERROR_PREFIX}{rank}").write_text(str(e))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
    return 0

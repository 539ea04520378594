"""A torchlm run folder without torch: checkpoint tags, ``latest``, checksums and the
environment variables the launcher hands its workers. ``torchlm train`` (the launcher,
one process per run beside torchrun's agent and the workers) needs only these, so it
does not import torch (~1.5 CPU-s a launch on a 2-core CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmspec import integrity
from lmspec.errors import UserError
from lmspec.io import atomic_write_text

CKPT_SUBDIR = "checkpoints"
FINAL_WEIGHTS = "model.safetensors"
LAUNCH_TIME_ENV = "TORCHLM_LAUNCH_TIME"
# set by the launcher to the checkpoint folder it verified, so workers do not hash again
VERIFIED_ENV = "TORCHLM_VERIFIED_CHECKPOINT"


def checkpoint_tag(step: int) -> str:
    """The DeepSpeed tag of the checkpoint taken after ``step`` steps: ``step00000010``."""
    return f"step{step:08d}"


def checkpoint_tags(out_dir: str | os.PathLike) -> list[str]:
    """Checkpoint folders (``step<NNNNNNNN>``) in ``out_dir``, oldest step first."""
    ckpt = Path(out_dir) / CKPT_SUBDIR
    return sorted(p.name for p in ckpt.glob("step*") if p.is_dir()) if ckpt.is_dir() else []


def save_engine_checkpoint(engine: Any, ckpt_dir: str | os.PathLike, step: int) -> str:
    """Save DeepSpeed checkpoint ``step<step>`` of ``engine`` into ``ckpt_dir`` so that a
    process killed at any moment leaves ``latest`` naming a complete checkpoint: a
    collective (every rank calls it); returns the tag.

    DeepSpeed's own ``save_checkpoint`` has rank 0 write ``latest`` as soon as rank 0's
    files are written, before the other ranks' ZeRO partitions are (its barrier comes
    after), so a kill in between leaves ``latest`` naming a torn checkpoint. Here
    DeepSpeed writes the files only (``save_latest=False``); once every rank is done,
    rank 0 lists their checksums and then moves ``latest`` (atomically).

    Writing over an existing folder (a ``--no-resume`` run reaching an old tag): its stale
    list is removed first, so it cannot vouch for a mix of old and new files, and so is a
    ``latest`` naming it (a kill during that save then starts the run over, as the
    ``--no-resume`` run was doing, rather than loading torn files)."""
    import torch.distributed as dist

    ckpt = Path(ckpt_dir)
    tag = checkpoint_tag(step)
    rank = dist.get_rank()
    if rank == 0:
        latest = ckpt / "latest"
        if latest.is_file() and latest.read_text(errors="replace").strip() == tag:
            latest.unlink()
        (ckpt / tag / integrity.CHECKSUMS).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"step": step},
                           save_latest=False)
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        integrity.write_checksums(ckpt / tag)
        atomic_write_text(ckpt / "latest", tag)
    dist.barrier()
    return tag


def _tags_advice(tags: list[str], ckpt: Path) -> str:
    if not tags:
        return "pass --no-resume to start over (no checkpoint folder exists)"
    return (f"write one of the checkpoint tags that exist ({', '.join(tags)}) into "
            f"{ckpt / 'latest'} to resume from it, or pass --no-resume to start over")


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Tag of the latest checkpoint in ``out_dir`` (DeepSpeed's ``latest``), or None when
    there is no ``latest`` file. A ``latest`` that is empty (a torn write) or names a
    folder that is not there is a :class:`UserError` listing the tags that exist: never
    a silent start from step 0 over the run's records."""
    ckpt = Path(out_dir) / CKPT_SUBDIR
    latest = ckpt / "latest"
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip().strip("\x00")  # a torn write may leave NULs
    except (OSError, UnicodeDecodeError):
        tag = ""
    tags = checkpoint_tags(out_dir)
    if not tag:
        raise UserError(f"{latest}: empty or unreadable (a torn write?); "
                        + _tags_advice(tags, ckpt))
    if "/" in tag or not (ckpt / tag).is_dir():
        raise UserError(f"{latest}: names checkpoint {tag!r}, which is not in {ckpt}; "
                        + _tags_advice(tags, ckpt))
    return tag


def verify_checkpoint(out_dir: str | os.PathLike, tag: str,
                      say: Any = None) -> bool:
    """Check checkpoint ``tag`` against its ``checksums.json`` (written by rank 0 after
    every rank's files, :mod:`lmspec.integrity`); False when it has none (older version,
    or a process stopped between DeepSpeed's save and the list), after a warning through
    ``say``. A bad file is a :class:`UserError` naming it and the previous tag."""
    ckpt = Path(out_dir) / CKPT_SUBDIR
    older = [t for t in checkpoint_tags(out_dir) if t < tag]
    if older:
        todo = (f"write {older[-1]} (the previous checkpoint) into {ckpt / 'latest'} to "
                "resume from it, or pass --no-resume to start over")
    else:
        todo = "pass --no-resume to start over (there is no earlier checkpoint)"
    if integrity.verify_checksums(ckpt / tag, todo):
        return True
    if say is not None:
        say(f"warning: {ckpt / tag} has no {integrity.CHECKSUMS} (written by an older "
            "version, or the run stopped right after the save): resuming from it unverified")
    return False

"""Weights & Biases logging of the metrics records (``log.wandb``: off | offline | online).

:class:`lmspec.metrics.MetricsWriter` opens a :class:`WandbLog` on the one process that
writes ``metrics.jsonl`` (jaxlm's process 0, DeepSpeed's rank 0) when ``log.wandb`` is
not ``off``. Each record is logged after it is in ``metrics.jsonl``, at its own ``step``,
with the field names of ``metrics.jsonl`` (fields that are null are left out); the
resolved config is the W&B run's config.

W&B mirrors the record, it never holds it: once the run has started, an error from W&B
is one warning, W&B logging stops and training, ``metrics.jsonl`` and TensorBoard go on.
Before training, a missing ``wandb`` package or a W&B run that cannot start (no
credentials for ``online``) is a :class:`~lmspec.errors.UserError`.

``offline`` writes the run under ``train.out_dir/wandb/offline-run-*``; ``wandb sync
DIR`` uploads it later. W&B's own service process writes that folder: its records are all
on disk once the trainer's process has exited (or, when :func:`jaxlm.trainer.train` was
called from Python, after ``wandb.teardown()``), not already when the run is finished. A
resumed training run starts a new W&B run of the same name whose history begins at the
resumed step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmspec.errors import UserError

INSTALL_HINT = "pip install 'jaxlm-parity[wandb]' (the wandb extra; or pip install wandb)"


def _import_wandb(mode: str) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise UserError(f"log.wandb={mode} needs the wandb package, which cannot be imported "
                        f"({e}): {INSTALL_HINT}, or set log.wandb=off") from None
    return wandb


def require_wandb(cfg: Any) -> None:
    """Before any work: a :class:`UserError` naming the extra to install when
    ``cfg.log.wandb`` asks for W&B and ``wandb`` cannot be imported."""
    if cfg.log.wandb != "off":
        _import_wandb(cfg.log.wandb)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class WandbLog:
    """One W&B run of a training run (``cfg``: the resolved :class:`ExperimentConfig`)."""

    def __init__(self, cfg: Any) -> None:
        lg = cfg.log
        wandb = _import_wandb(lg.wandb)
        out = Path(cfg.train.out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        self._warned = False
        self._abandoned = None
        try:
            self.run = wandb.init(
                mode=lg.wandb, project=lg.wandb_project, entity=lg.wandb_entity or None,
                group=lg.wandb_group or None, name=lg.wandb_name or out.name,
                dir=str(out),  # W&B writes <out>/wandb/
                config=cfg.to_dict(),
                # a W&B run the caller may hold stays theirs; this one is ours to finish
                reinit="create_new",
                # stdout/stderr stay the trainer's own (train.log, progress bars)
                settings=wandb.Settings(console="off"),
            )
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds at start
            fix = ("run `wandb login` or set WANDB_API_KEY, or use log.wandb=offline and "
                   "`wandb sync` later" if lg.wandb == "online" else "or set log.wandb=off")
            raise UserError(f"log.wandb={lg.wandb}: W&B could not start a run "
                            f"({type(e).__name__}: {_first_line(e)}); {fix}") from e

    def write(self, record: dict[str, Any]) -> None:
        """Log one metrics record at its step (NaN and inf stay numbers: W&B keeps them)."""
        if self.run is None:
            return
        data = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()
                if v is not None}
        try:
            self.run.log(data, step=int(record["step"]))
        except Exception as e:  # noqa: BLE001 - W&B must never end a training run
            self._give_up(f"at step {record['step']}", e)

    def close(self, failed: bool = False) -> None:
        """Finish the W&B run (exit code 1 when training failed)."""
        run, self.run = self.run or self._abandoned, None
        self._abandoned = None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001
            self._give_up("finishing the run", e)

    def _give_up(self, where: str, e: BaseException) -> None:
        # no more records: one warning, not one per step (close still tries to finish)
        self._abandoned, self.run = self.run, None
        if not self._warned:
            self._warned = True
            print(f"warning: W&B logging failed {where} ({type(e).__name__}: "
                  f"{_first_line(e)}); it stops here, metrics.jsonl and TensorBoard go on",
                  file=sys.stderr, flush=True)


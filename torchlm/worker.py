"""``python -m torchlm.worker CONFIG [k=v ...]``: one training process.

Run it under a launcher (``torchrun --nproc_per_node N -m torchlm.worker ...`` or
``deepspeed --module torchlm.worker ...``), or alone for world size 1. ``torchlm train``
does the launching for you.
"""

from torch.distributed.elastic.multiprocessing.errors import record

from lmspec.cli import run
from torchlm.trainer import main


@record
def _entry() -> int:
    return run(main)


if __name__ == "__main__":
    raise SystemExit(_entry())

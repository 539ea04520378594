"""``python -m torchlm.worker CONFIG [k=v ...]``: one training process.

Run it under a launcher (``torchrun --nproc_per_node N -m torchlm.worker ...`` or
``deepspeed --module torchlm.worker ...``), or alone for world size 1. ``torchlm train``
does the launching for you.
"""

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from lmspec.cli import run
from torchlm.trainer import main


@record
def _entry() -> int:
    # a bug propagates to @record, which writes it where torchrun's launcher finds it
    return run(main, raise_bugs=True)


if __name__ == "__main__":
    rc = _entry()
    # Leave without interpreter teardown. On CPU a native background thread (gloo /
    # DeepSpeed) still joinable at static destruction sometimes aborts a finished worker
    # ("terminate called without an active exception", seen once in ~50 launches here),
    # which would turn a complete run into a failure. Every output is written atomically
    # and the process group is destroyed by now; only the streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

"""Leave out an import DeepSpeed makes only to ask a question torchlm answers already.

DeepSpeed 0.19's ZeRO and bf16 optimizers import ``deepspeed.runtime.zero.muon.
muon_optimizer`` for one thing: ``isinstance(optimizer, MuonWithAuxAdam)`` (or
``type(optimizer) in [..., MuonWithAuxAdam]``). Importing it runs ``torch.compile`` on
Muon's kernels, which loads torch._inductor: ~1.4 CPU-s per process on our 2-core CPU,
paid by every DeepSpeed worker of every run (DeepSpeed's own comments say the import is
deferred for this cost). torchlm always hands DeepSpeed a ``torch.optim.AdamW``
(:func:`torchlm.ds_config.build_optimizer`), never a Muon optimizer, so a stand-in class
that no optimizer is an instance of gives every such check the answer the real class
gives. Nothing numeric depends on it. ``TORCHLM_REAL_MUON=1`` imports the real module.
"""

from __future__ import annotations

import os
import sys
import types

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"
REAL_MUON_ENV = "TORCHLM_REAL_MUON"


class MuonWithAuxAdam:
    """Stand-in for DeepSpeed's Muon optimizer class: torchlm never builds one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"torchlm registered a stand-in for {MUON_MODULE} (it trains "
                           f"with AdamW); set {REAL_MUON_ENV}=1 to use DeepSpeed's Muon")


def skip_muon_import() -> bool:
    """Register the stand-in module unless the real one is imported already or
    ``TORCHLM_REAL_MUON=1``; True when the stand-in is in place."""
    current = sys.modules.get(MUON_MODULE)
    if current is not None:
        return getattr(current, "TORCHLM_STAND_IN", False)
    if os.environ.get(REAL_MUON_ENV) == "1":
        return False
    module = types.ModuleType(MUON_MODULE, "torchlm's stand-in (see torchlm.lean)")
    module.MuonWithAuxAdam = MuonWithAuxAdam  # type: ignore[attr-defined]
    module.TORCHLM_STAND_IN = True  # type: ignore[attr-defined]
    sys.modules[MUON_MODULE] = module
    return True

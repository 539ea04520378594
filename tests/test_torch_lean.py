"""torchlm.lean: DeepSpeed's Muon import replaced by a stand-in that answers DeepSpeed's
questions about torchlm's AdamW as the real class does, without loading torch._inductor.
(That training numerics do not move is covered by the DeepSpeed tests, which all run
with the stand-in: tests/test_torch_zero.py against the plain torch reference.)"""

import json
import os
import subprocess
import sys

import pytest

CHECK = r"""
import json, sys, tempfile
import torch, torch.distributed as dist
from torchlm.lean import MUON_MODULE, skip_muon_import
standin = skip_muon_import()
import deepspeed
from deepspeed.runtime.zero.utils import is_zero_supported_optimizer
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0,
                        world_size=1)
deepspeed.comm.init_distributed("gloo", auto_mpi_discovery=False)
opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
print(json.dumps({"standin": standin, "supported": is_zero_supported_optimizer(opt),
                  "is_muon": isinstance(opt, MuonWithAuxAdam),
                  "inductor_compile": "torch._inductor.compile_fx" in sys.modules,
                  "module_is_standin": getattr(sys.modules[MUON_MODULE],
                                               "TORCHLM_STAND_IN", False)}))
"""


def _check(real: bool) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("TORCHLM_REAL_MUON", None)
    if real:
        env["TORCHLM_REAL_MUON"] = "1"
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_standin_answers_as_the_real_class_without_inductor():
    lean, real = _check(real=False), _check(real=True)
    assert lean == {"standin": True, "supported": True, "is_muon": False,
                    "inductor_compile": False, "module_is_standin": True}
    # the real module: same answers to DeepSpeed's questions, at the cost of inductor
    assert real["standin"] is False and real["module_is_standin"] is False
    assert (real["supported"], real["is_muon"]) == (lean["supported"], lean["is_muon"])
    assert real["inductor_compile"] is True


def test_standin_cannot_be_used_as_an_optimizer():
    from torchlm.lean import MuonWithAuxAdam

    with pytest.raises(RuntimeError, match="TORCHLM_REAL_MUON=1"):
        MuonWithAuxAdam([])

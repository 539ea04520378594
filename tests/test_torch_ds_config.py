"""DeepSpeed config, optimizer groups and LR schedule built from ExperimentConfig."""

from __future__ import annotations

import json

import pytest
import torch

from lmspec.config import load_config
from lmspec.schedule import lr_at
from lmspec.weights import decays
from torchlm.cli import main
from torchlm.ds_config import (
    build_ds_config,
    build_optimizer,
    build_scheduler,
    model_attention,
    optimizer_spec,
    param_groups,
)
from torchlm.model import Llama

CONFIG = "configs/tiny.yaml"


def test_ds_config_fields() -> None:
    cfg = load_config(CONFIG, ["zero.stage=2", "zero.world_size=2", "train.micro_batch_size=2",
                               "train.precision=bf16", "optim.grad_clip=0.5"])
    conf = build_ds_config(cfg)
    assert conf["train_batch_size"] == 8
    assert conf["train_micro_batch_size_per_gpu"] == 2
    assert conf["gradient_accumulation_steps"] == 2
    assert conf["train_batch_size"] == (conf["train_micro_batch_size_per_gpu"]
                                        * conf["gradient_accumulation_steps"] * 2)
    assert conf["zero_optimization"]["stage"] == 2
    assert conf["gradient_clipping"] == 0.5
    assert conf["bf16"] == {"enabled": True}
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"}
    assert conf["communication_data_type"] == "fp32"
    assert "optimizer" not in conf and "scheduler" not in conf  # passed as objects


def test_ds_config_fp32_stage0_and_world_size_argument() -> None:
    cfg = load_config(CONFIG, ["zero.stage=0", "optim.grad_clip=0"])
    conf = build_ds_config(cfg, world_size=1)
    assert conf["gradient_accumulation_steps"] == 8
    assert conf["gradient_clipping"] == 0.0
    assert conf["bf16"] == {"enabled": False} and "data_types" not in conf
    # ZeRO 0 + bf16: DeepSpeed 0.19 only accepts bf16 accumulation there
    bf = build_ds_config(load_config(CONFIG, ["zero.stage=0", "train.precision=bf16"]))
    assert bf["data_types"] == {"grad_accum_dtype": "bf16"}


def test_ds_config_cli_prints_json(capsys) -> None:
    assert main(["ds-config", CONFIG, "zero.stage=3"]) == 0
    out = capsys.readouterr().out
    conf = json.loads(out)
    assert conf == build_ds_config(load_config(CONFIG, ["zero.stage=3"]))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_profiles_differ_only_in_speed_settings(stage: int, precision: str) -> None:
    """parity: no comm/compute overlap, unfused AdamW, repeat_kv attention; bench: overlap,
    fused AdamW, flash attention; the precision policy and batch layout are the same."""
    common = [f"zero.stage={stage}", f"train.precision={precision}"]
    parity = load_config(CONFIG, common)
    bench = load_config(CONFIG, [*common, "zero.profile=bench"])
    assert parity.zero.profile == "parity"  # the default
    p_conf, b_conf = build_ds_config(parity), build_ds_config(bench)
    if stage == 0:
        assert b_conf == p_conf
    else:
        assert p_conf["zero_optimization"] == {"stage": stage, "contiguous_gradients": True,
                                               "overlap_comm": False}
        assert b_conf["zero_optimization"] == {"stage": stage, "contiguous_gradients": True,
                                               "overlap_comm": True}
        assert {k: v for k, v in b_conf.items() if k != "zero_optimization"} == \
            {k: v for k, v in p_conf.items() if k != "zero_optimization"}
    assert (model_attention(parity), model_attention(bench)) == ("repeat_kv", "flash")
    model = Llama(load_config(CONFIG, ["model.num_hidden_layers=1"]).model)
    for device, want in (("cpu", (False, False)), ("cuda", (True, False))):
        d = build_optimizer(model, parity, device).defaults
        assert (d["foreach"], d["fused"]) == want
        d = build_optimizer(model, bench, device).defaults
        assert (d["foreach"], d["fused"]) == (False, True)


def test_ds_config_cli_bench_profile(capsys) -> None:
    assert main(["ds-config", CONFIG, "zero.stage=2", "zero.profile=bench"]) == 0
    cap = capsys.readouterr()
    conf = json.loads(cap.out)
    assert conf["zero_optimization"]["overlap_comm"] is True
    assert conf == build_ds_config(load_config(CONFIG, ["zero.stage=2", "zero.profile=bench"]))
    assert "zero.profile=bench" in cap.err
    spec = json.loads(cap.err.split(":", 1)[1].strip().split("\n")[0])
    assert (spec["kernel"], spec["attention"]) == ("fused", "flash")
    assert optimizer_spec(load_config(CONFIG))["attention"] == "repeat_kv"
    assert main(["ds-config", CONFIG, "zero.profile=fast"]) == 2
    assert "zero.profile='fast': allowed are ['parity', 'bench']" in capsys.readouterr().err


def test_ds_config_cli_rejects_bad_stage(capsys) -> None:
    assert main(["ds-config", CONFIG, "zero.stage=4"]) == 2
    assert "zero.stage=4" in capsys.readouterr().err


@pytest.mark.parametrize("mask", ["matrices", "all", "none"])
def test_param_groups_follow_the_decay_mask(mask: str) -> None:
    cfg = load_config(CONFIG, [f"optim.wd_mask={mask}"])
    model = Llama(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            want = decays(names[id(p)], tuple(p.shape), mask)
            assert g["weight_decay"] == (cfg.optim.weight_decay if want else 0.0)
            seen += 1
    assert seen == len(names)
    assert len(param_groups(model, cfg)) == (2 if mask == "matrices" else 1)
    d = opt.defaults
    assert (d["betas"], d["eps"], d["amsgrad"], d["foreach"], d["fused"]) == (
        (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps, False, False, False)


def test_lambdalr_gives_update_s_the_rate_lr_at_s() -> None:
    """LambdaLR applies lambda(0) at construction and DeepSpeed steps the scheduler
    after each optimizer step: the update of step s runs with lr_at(s), bit for bit."""
    cfg = load_config(CONFIG, ["optim.warmup_steps=3", "optim.decay_steps=7"])
    model = Llama(load_config(CONFIG, ["model.num_hidden_layers=1"]).model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for s in range(10):
        assert all(g["lr"] == lr_at(s, cfg.optim) for g in opt.param_groups)
        opt.step()
        sched.step()
    # the schedule survives a checkpoint round trip (DeepSpeed saves the state dict)
    state = sched.state_dict()
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 10 and sched2.get_last_lr()[0] == lr_at(10, cfg.optim)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_train_refuses_to_resume_a_checkpoint_of_another_config(tmp_path, capsys) -> None:
    """Checked before any worker starts: exit 2 naming the keys, the run dir untouched."""
    from lmspec.config import load_config, save_config
    from torchlm.cli import main

    out = tmp_path / "run"
    save_config(load_config("configs/tiny.yaml", ["zero.stage=3"]), out / "config.yaml")
    (out / "checkpoints" / "step00000004").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000004")
    before = (out / "config.yaml").read_bytes()
    rc = main(["train", "configs/tiny.yaml", f"train.out_dir={out}", "zero.stage=1",
               "model.num_hidden_layers=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.num_hidden_layers: checkpoint 4, config 2" in err
    assert "zero.stage: checkpoint 3, config 1" in err
    assert (out / "config.yaml").read_bytes() == before
    assert not (out / "metrics.jsonl").exists()

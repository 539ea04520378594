"""`parity translate`: a DeepSpeed config JSON as our config sections, with its precision
traps. Round trip through our own `torchlm ds-config`, and DeepSpeed-style configs of the
kinds DeepSpeed's documentation shows (written here, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmspec.config import load_config
from lmspec.errors import UserError
from parity.translate_cmd import render, translate
from torchlm.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _trap_names(t) -> list[str]:
    return [what for what, _, _ in t.traps]


@pytest.mark.parametrize("stage,precision,world", [
    (0, "fp32", 2), (1, "fp32", 2), (2, "bf16", 2), (3, "bf16", 4), (1, "bf16", 1),
])
def test_round_trip_of_our_own_ds_config(tmp_path, stage, precision, world):
    cfg = load_config(TINY, [f"zero.stage={stage}", f"train.precision={precision}",
                             f"zero.world_size={world}", "train.global_batch_size=16",
                             "train.micro_batch_size=2"])
    ds = build_ds_config(cfg)
    t = translate(json.loads(json.dumps(ds)))
    assert t.unknown == []
    # our ds-config passes optimizer and schedule as objects: only those two are unseen
    assert _trap_names(t) == ["no optimizer section", "no scheduler section"]
    yml = tmp_path / "translated.yaml"
    yml.write_text(render(t, "ds.json", base=str(TINY)))
    back = load_config(yml)
    assert back.to_dict() == cfg.to_dict()


FP16_DOC_STYLE = {  # the shape of DeepSpeed's documented fp16 + Adam + WarmupLR example
    "train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "betas": [0.8, 0.999],
                                             "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                 "warmup_num_steps": 1000}},
    "gradient_clipping": 1.0,
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "allgather_partitions": True,
                          "allgather_bucket_size": 5e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8,
                          "contiguous_gradients": True},
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
}

BF16_ZERO3_DOC_STYLE = {  # bf16 + ZeRO-3 offload + WarmupDecayLR, DeepSpeed's defaults
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "train_batch_size": 64,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95],
                                              "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0,
                                                      "warmup_max_lr": 3e-4,
                                                      "warmup_num_steps": 100,
                                                      "total_num_steps": 5000,
                                                      "warmup_type": "linear"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                            "pin_memory": True},
                          "stage3_prefetch_bucket_size": 5e7,
                          "stage3_param_persistence_threshold": 1e5},
    "tensorboard": {"enabled": True, "output_path": "tb/"},
}


def test_fp16_documented_style_config_flags_its_traps():
    t = translate(FP16_DOC_STYLE)
    c = t.config
    assert c["train"] == {"global_batch_size": 32, "micro_batch_size": 32,
                          "precision": "bf16"}
    assert c["zero"]["stage"] == 2 and c["zero"]["world_size"] == 1
    assert c["optim"]["lr"] == 0.001 and c["optim"]["beta1"] == 0.8
    assert c["optim"]["warmup_steps"] == 1000 and c["optim"]["min_lr_ratio"] == 1.0
    traps = " | ".join(_trap_names(t))
    for trap in ("fp16.enabled", "grad_accum_dtype", "communication_data_type",
                 "overlap_comm", "warmup_type", "warm-up starts at step 0",
                 "weight decay on which tensors"):
        assert trap in traps, (trap, traps)
    assert t.unknown == []
    assert "fp16.loss_scale" in t.ds_only and "steps_per_print" in t.ds_only
    text = render(t, "ds.json")
    assert text.count("# - ") == len(t.traps) and "Fix:" in text


def test_bf16_zero3_offload_config_flags_its_traps():
    t = translate(BF16_ZERO3_DOC_STYLE)
    c = t.config
    assert c["zero"] == {"profile": "parity", "world_size": 2, "stage": 3}
    assert c["train"]["micro_batch_size"] == 4 and c["train"]["precision"] == "bf16"
    assert c["optim"]["decay_steps"] == 5000 and c["optim"]["min_lr_ratio"] == 0.0
    traps = " | ".join(_trap_names(t))
    for trap in ("data_types.grad_accum_dtype: unset", "communication_data_type: unset",
                 "offload_optimizer.device: cpu", "WarmupDecayLR"):
        assert trap in traps, (trap, traps)
    assert "warmup_type" not in traps  # linear: nothing to flag
    assert "tensorboard" in t.ds_only and t.unknown == []


def test_unknown_keys_are_listed_never_dropped_and_bad_batches_refused():
    ds = {**FP16_DOC_STYLE, "my_feature": {"x": 1},
          "zero_optimization": {**FP16_DOC_STYLE["zero_optimization"], "frobnicate": 1},
          "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "max_coeff": 10}}}
    t = translate(ds)
    assert {"my_feature", "zero_optimization.frobnicate",
            "optimizer.params.max_coeff"} <= set(t.unknown)
    assert "optimizer type 'Lamb'" in _trap_names(t)
    text = render(t, "ds.json")
    for key in t.unknown:
        assert f"#   {key}" in text
    with pytest.raises(UserError, match="train_batch_size=30"):
        translate({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                   "gradient_accumulation_steps": 2})
    with pytest.raises(UserError, match="stage=5"):
        translate({**FP16_DOC_STYLE, "zero_optimization": {"stage": 5}})


def test_cli(tmp_path, capsys):
    from parity.cli import main

    f = tmp_path / "ds.json"
    f.write_text(json.dumps(BF16_ZERO3_DOC_STYLE))
    with pytest.raises(SystemExit) as e:
        main(["translate", str(f), "--base", str(TINY)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    (tmp_path / "t.yaml").write_text(out)
    cfg = load_config(tmp_path / "t.yaml")
    assert cfg.zero.stage == 3 and cfg.train.precision == "bf16" and cfg.optim.lr == 3e-4
    f.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["translate", str(f)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")

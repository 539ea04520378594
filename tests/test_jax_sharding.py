"""Golden PartitionSpecs of every parameter, and the errors raised before compiling.

The golden files in tests/golden/jax_specs_*.json are checked in. After an intended
change of the rules or the parameter layout, regenerate them with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_jax_sharding.py

and review the diff; the test fails on any spec that differs from its file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")

from jaxlm import sharding as shd  # noqa: E402
from jaxlm.trainer import build_setup  # noqa: E402
from lmspec.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"

# name -> overrides of configs/tiny.yaml
LAYOUTS: dict[str, list[str]] = {
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
    "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "data2_tensor4": ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"],
    "data8": ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
    "data2_fsdp2_tensor2_unscanned": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                      "train.scan_layers=false"],
    # FSDP switched to tensor parallelism by a rules edit only
    "tensor8_rules": ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8", "mesh.rules.embed=null",
                      "mesh.rules.kv_heads=null", "mesh.rules.act_kv_heads=null"],
}


def specs_for(overrides: list[str]) -> dict[str, list]:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    setup = build_setup(cfg)
    out = {name: shd.spec_to_json(spec) for name, spec in sorted(setup.param_specs.items())}
    m, b, t1 = setup.batch_shape
    out["<batch (M, B, T+1)>"] = shd.spec_to_json(setup.batch_sharding.spec)
    out["<batch shape>"] = [m, b, t1]
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_param_specs_match_golden(layout: str) -> None:
    path = GOLDEN / f"jax_specs_{layout}.json"
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(specs_for(LAYOUTS[layout])))
    assert got == want, f"sharding specs of {layout} changed; see the module docstring"


def test_golden_files_are_distinct_and_sharded() -> None:
    seen = {}
    for layout in LAYOUTS:
        data = json.loads((GOLDEN / f"jax_specs_{layout}.json").read_text())
        seen[json.dumps(data, sort_keys=True)] = layout
        sharded = any(v for k, v in data.items() if not k.startswith("<"))
        assert sharded == (layout != "data8"), layout  # pure data parallel replicates
    assert len(seen) == len(LAYOUTS)


def test_specs_have_expected_meaning() -> None:
    s = specs_for(LAYOUTS["data2_fsdp2_tensor2"])
    assert s["layers.attn.q_dhq"] == [None, "fsdp", "tensor"]  # (L, D, H, Q)
    assert s["layers.mlp.down_fd"] == [None, "tensor", "fsdp"]  # (L, F, D)
    assert s["embed_vd"] == ["tensor", "fsdp"]
    assert s["layers.input_norm.scale"] == []
    assert s["<batch (M, B, T+1)>"] == [None, ["data", "fsdp"]]


def _err(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        build_setup(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    return str(e.value)


def test_mesh_must_match_device_count() -> None:
    msg = _err(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"])
    assert "= 4 but 8 devices are available" in msg
    msg = _err(["mesh.data=3", "mesh.fsdp=-1", "mesh.tensor=1"])
    assert "8 devices cannot be split" in msg


def test_indivisible_dimension_names_param_dim_and_axis() -> None:
    # 4 kv heads over tensor=8
    msg = _err(["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"])
    assert "parameter 'layers.attn.k_dkq'" in msg
    assert "dimension 2 ('kv_heads', size 4)" in msg and "tensor=8" in msg


def test_indivisible_unscanned_and_embed() -> None:
    msg = _err(["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "model.hidden_size=260",
                "model.num_attention_heads=2", "model.num_key_value_heads=2",
                "train.scan_layers=false"])
    assert "dimension" in msg and "'embed', size 260" in msg and "fsdp=8" in msg
    assert "parameter '" in msg


def test_one_mesh_axis_per_tensor() -> None:
    msg = _err(["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4", "mesh.rules.vocab=fsdp"])
    assert "same mesh axis 'fsdp'" in msg


def test_batch_must_divide_its_axes() -> None:
    # act_batch on tensor too: rows per micro-batch (2) cannot split over 2*2*2 devices
    msg = _err(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                "mesh.rules.act_batch=[data, fsdp, tensor]"])
    assert "batch" in msg and "size 4" in msg


def test_activation_constraint_is_noop_without_mesh() -> None:
    x = jax.numpy.ones((3, 5))
    assert shd.constrain(x, ("act_batch", "act_embed")) is x


def _regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for layout, overrides in LAYOUTS.items():
        path = GOLDEN / f"jax_specs_{layout}.json"
        path.write_text(json.dumps(specs_for(overrides), indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 first")
    _regenerate()

"""lmspec.config: YAML loading, base chains, overrides, errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lmspec.config import (
    DEFAULT_RULES,
    ConfigError,
    ExperimentConfig,
    MeshConfig,
    from_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in ALL_CONFIGS}
    for model in ("tiny", "small", "llama-125m", "llama-350m", "llama-1b", "llama-7b"):
        assert f"models/{model}.yaml" in names
    assert "tiny.yaml" in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    raw = yaml.safe_load(path.read_text())
    # what the file says is what was loaded (base values only fill the rest)
    for section, values in raw.items():
        if isinstance(values, dict) and section != "mesh":
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value or (isinstance(got, float) and got == float(value)), \
                    f"{path.name}: {section}.{key}"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_model_shapes_of_named_sizes():
    tiny = load_config(ROOT / "configs" / "models" / "tiny.yaml").model
    assert (tiny.num_attention_heads, tiny.num_key_value_heads) == (8, 4)
    seven = load_config(ROOT / "configs" / "models" / "llama-7b.yaml").model
    # Llama-2-7B (Touvron et al. 2023, table 2 and the released config.json)
    assert (seven.hidden_size, seven.intermediate_size, seven.num_hidden_layers,
            seven.num_attention_heads, seven.num_key_value_heads, seven.vocab_size) == (
        4096, 11008, 32, 32, 32, 32000)


# ----------------------------------------------------------------------------- overrides


def test_overrides_coerce_types():
    cfg = load_config(TINY, [
        "train.steps=7", "optim.lr=3e-4", "optim.warmup_steps=2.0", "train.scan_layers=false",
        "model.tie_word_embeddings=True", "name=exp1", "data.source=123",
        "mesh.rules.embed=null", "mesh.rules.act_batch=[data, fsdp]", "mesh.rules.mlp=fsdp",
        "optim.beta2=0.99",
    ])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.warmup_steps == 2 and type(cfg.optim.warmup_steps) is int
    assert cfg.train.scan_layers is False
    assert cfg.model.tie_word_embeddings is True
    assert cfg.name == "exp1"
    assert cfg.data.source == "123"
    assert cfg.mesh.rules["embed"] is None
    assert cfg.mesh.rules["act_batch"] == ["data", "fsdp"]
    assert cfg.mesh.rules["mlp"] == "fsdp"
    # untouched rules keep their defaults
    assert cfg.mesh.rules["heads"] == DEFAULT_RULES["heads"]
    assert cfg.optim.beta2 == 0.99
    # the later of two overrides of one key wins
    assert load_config(TINY, ["train.steps=3", "train.steps=4"]).train.steps == 4


def test_dataclasses_are_frozen_and_keyword_only():
    cfg = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        MeshConfig(1, 2, 3)  # type: ignore[misc]


@pytest.mark.parametrize("override, key", [
    ("nope=1", "nope"),
    ("no.such_key=1", "no.such_key"),
    ("data.nope=1", "data.nope"),
    ("model.num_heads=4", "model.num_heads"),
    ("train.steps.deeper=1", "train.steps"),
    ("model=3", "model"),
    ("mesh.rules.unknown_axis=data", "mesh.rules.unknown_axis"),
])
def test_unknown_key_override_names_it(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_unknown_key_in_yaml_names_it(tmp_path):
    for text, key in [("nope: 1\n", "nope"), ("data:\n  nope: 1\n", "data.nope"),
                      ("optim:\n  learning_rate: 1.0\n", "optim.learning_rate")]:
        p = tmp_path / "c.yaml"
        p.write_text(f"base: {TINY}\n" + text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(p)


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("train.scan_layers=maybe", "train.scan_layers"),
    ("mesh.rules=3", "mesh.rules"),
    ("mesh.fsdp=two", "mesh.fsdp"),
])
def test_wrong_type_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    for text, key in [("model:\n  hidden_size: big\n", "model.hidden_size"),
                      ("train:\n  steps: true\n", "train.steps"),
                      ("data:\n  source: [a, b]\n", "data.source"),
                      ("model: 5\n", "model"),
                      ("train:\n  precision: 16\n", "train.precision")]:
        p = tmp_path / "c.yaml"
        p.write_text(f"base: {TINY}\n" + text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(p)


# every check in the validate() methods, each with a value it must refuse
IMPOSSIBLE = [
    (["model.vocab_size=0"], "model.vocab_size"),
    (["model.hidden_size=-8"], "model.hidden_size"),
    (["model.intermediate_size=0"], "model.intermediate_size"),
    (["model.num_hidden_layers=0"], "model.num_hidden_layers"),
    (["model.num_attention_heads=0"], "model.num_attention_heads"),
    (["model.num_key_value_heads=0"], "model.num_key_value_heads"),
    (["model.max_position_embeddings=0"], "model.max_position_embeddings"),
    (["model.hidden_size=250"], "model.hidden_size"),  # not divisible by 8 heads
    (["model.hidden_size=24"], "model.hidden_size"),  # head_dim 3 is odd
    (["model.num_key_value_heads=3"], "model.num_key_value_heads"),  # 8 % 3
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.rms_norm_eps=0"], "model.rms_norm_eps"),
    (["model.rms_norm_eps=1"], "model.rms_norm_eps"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data.val_fraction=1"], "data.val_fraction"),
    (["data.val_fraction=-0.1"], "data.val_fraction"),
    (["data.max_bytes=-1"], "data.max_bytes"),
    (["data.source="], "data.source"),
    (["data.tokenizer=wordpiece"], "data.tokenizer"),
    (["data.tokenizer=bpe:many"], "data.tokenizer"),
    (["data.tokenizer=bpe:100"], "data.tokenizer"),
    (["data.seq_len=2048"], "data.seq_len"),  # > max_position_embeddings=1024
    (["optim.lr=-1e-3"], "optim.lr"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.decay_steps=5"], "optim.decay_steps"),  # < warmup_steps=10
    (["optim.beta1=1.0"], "optim.beta1"),
    (["optim.beta2=-0.5"], "optim.beta2"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.wd_mask=biases"], "optim.wd_mask"),
    (["train.steps=0"], "train.steps"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.log_every=0"], "train.log_every"),
    (["train.ckpt_keep=0"], "train.ckpt_keep"),
    (["train.eval_batches=0"], "train.eval_batches"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.ckpt_every=-1"], "train.ckpt_every"),
    (["train.warmup_steps_excluded=-1"], "train.warmup_steps_excluded"),
    (["train.precision=fp16"], "train.precision"),
    (["train.remat=everything"], "train.remat"),
    (["train.attention=flash"], "train.attention"),
    (["train.out_dir="], "train.out_dir"),
    # 8 % (3 * zero.world_size 2)
    (["train.micro_batch_size=3"], "train.global_batch_size"),
    # divisible by micro*world_size (2) but not by micro*data*fsdp (1*1*3)
    (["mesh.fsdp=3"], "mesh.data*mesh.fsdp"),
    (["mesh.data=0"], "mesh.data"),
    (["mesh.tensor=-2"], "mesh.tensor"),
    (["mesh.data=-1"], "at most one of data/fsdp/tensor"),  # fsdp is -1 already
    (["mesh.rules.embed=gpu"], "mesh.rules.embed"),
    (["mesh.rules.act_batch=[data, pipeline]"], "mesh.rules.act_batch"),
    (["zero.stage=4"], "zero.stage"),
    (["zero.world_size=0"], "zero.world_size"),
    (["zero.profile=fast"], "zero.profile='fast': allowed are ['parity', 'bench']"),
    (["distributed.num_processes=0"], "distributed.num_processes"),
    (["distributed.process_id=-2"], "distributed.process_id"),
    (["distributed.num_processes=2", "distributed.process_id=2"], "distributed.process_id"),
    (["name="], "name"),
]


@pytest.mark.parametrize("overrides, key", IMPOSSIBLE, ids=[" ".join(o) for o, _ in IMPOSSIBLE])
def test_impossible_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert key in str(e.value)


def test_tiny_itself_is_valid_for_every_impossible_case():
    """The cases above fail because of their override, not because of the base."""
    cfg = load_config(TINY)
    assert cfg.model.max_position_embeddings == 1024
    assert cfg.optim.warmup_steps == 10
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    assert (cfg.train.global_batch_size, cfg.zero.world_size) == (8, 2)


def test_mesh_resolve():
    cfg = load_config(TINY)
    assert cfg.mesh.resolve(8) == {"data": 1, "fsdp": 8, "tensor": 1}
    m = load_config(TINY, ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"]).mesh
    assert m.resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="cannot be split"):
        m.resolve(6)
    fixed = load_config(TINY, ["mesh.data=2", "mesh.fsdp=2"]).mesh
    with pytest.raises(ConfigError, match="8 devices"):
        fixed.resolve(8)


def test_grad_accum_steps():
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert cfg.grad_accum_steps(1) == 8
    assert cfg.grad_accum_steps(4) == 2
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.grad_accum_steps(3)


def test_save_config_loads_back_equal(tmp_path):
    cfg = load_config(TINY, ["train.steps=17", "optim.lr=2.5e-4", "mesh.rules.embed=null",
                             "mesh.rules.act_batch=[data, fsdp]", "data.tokenizer=bpe:300",
                             "model.tie_word_embeddings=true"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    back = load_config(tmp_path / "run" / "config.yaml")
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]


# ----------------------------------------------------------------------------- base chains


def test_base_string_list_relative_and_order(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "models" / "m.yaml").write_text(
        "model:\n  hidden_size: 64\n  num_attention_heads: 4\n  num_key_value_heads: 2\n")
    (tmp_path / "common.yaml").write_text(
        "base: models/m.yaml\nname: common\ntrain:\n  steps: 5\n  seed: 3\n"
        "model:\n  hidden_size: 128\n")
    (tmp_path / "other.yaml").write_text("train:\n  steps: 9\n")
    (tmp_path / "exp" / "a.yaml").write_text(
        "base: [../common.yaml, ../other.yaml]\nname: a\ntrain:\n  seed: 11\n")
    cfg = load_config(tmp_path / "exp" / "a.yaml")
    assert cfg.name == "a"
    assert cfg.model.hidden_size == 128  # common overrides its own base
    assert cfg.model.num_attention_heads == 4  # from models/m.yaml, two levels down
    assert cfg.train.steps == 9  # later base in the list wins
    assert cfg.train.seed == 11  # the file itself wins over its bases
    # a single string base
    (tmp_path / "exp" / "b.yaml").write_text("base: ../other.yaml\n")
    assert load_config(tmp_path / "exp" / "b.yaml").train.steps == 9


def test_base_loops_and_missing_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [c.yaml, a.yaml]\n")
    (tmp_path / "c.yaml").write_text("name: c\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "self.yaml")
    # the same base reached twice without a cycle (a diamond) is fine
    (tmp_path / "d1.yaml").write_text("base: c.yaml\n")
    (tmp_path / "d2.yaml").write_text("base: c.yaml\n")
    (tmp_path / "diamond.yaml").write_text("base: [d1.yaml, d2.yaml]\n")
    assert load_config(tmp_path / "diamond.yaml").name == "c"
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_from_dict_defaults_and_override_syntax():
    assert from_dict({}) == ExperimentConfig()
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        from_dict({}, ["train.steps"])
    with pytest.raises(ConfigError, match="empty key"):
        from_dict({}, ["=3"])
    with pytest.raises(ConfigError, match="'train' is a section"):
        from_dict({}, ["train=3"])


def test_resume_mismatches_names_changed_keys() -> None:
    from lmspec.config import resume_mismatches

    cfg = load_config(TINY)
    saved = cfg.to_dict()
    assert resume_mismatches(saved, cfg, ("model", "zero.stage")) == []
    assert resume_mismatches(None, cfg, ("model",)) == []
    saved["model"]["hidden_size"] = 128
    saved["zero"]["stage"] = 3
    saved["train"]["steps"] = 5  # not asked about: ignored
    assert resume_mismatches(saved, cfg, ("model", "zero.stage")) == [
        "model.hidden_size: checkpoint 128, config 256",
        "zero.stage: checkpoint 3, config 1",
    ]

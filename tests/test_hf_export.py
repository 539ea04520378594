"""Hugging Face folders from both trainers (lmspec.hf, `jaxlm export`, `torchlm export
--out`): transformers' LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained
load them offline and give the logits and greedy tokens of our own models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.errors import UserError
from lmspec.hf import INDEX_FILE, parse_size, write_hf_folder
from lmspec.tokenizer import ByteTokenizer
from lmspec.weights import init_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TEXTS = ["def main(argv):\n    return 0\n", "héllo wörld ☃ 日本", " leading  spaces\t"]
# a wrong name mapping, transposition or head order gives O(1) logit errors; two fp32
# implementations of one model differ by ~1e-6 relative here (parity's forward check)
LOGITS_ATOL = 1e-4
# TensorBoard tags both trainers write (lmspec.metrics; mfu is none on a CPU)
TB_TAGS = {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s"}


def _tb_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def _hf(folder: Path):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder),
                                                          dtype=torch.float32).eval()
    return tok, model


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_byte_tokenizer_json_is_the_byte_tokenizer(tmp_path):
    cfg = load_config(TINY)
    write_hf_folder(tmp_path / "hf", init_weights(cfg.model, 0), cfg.model, ByteTokenizer())
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = ByteTokenizer()
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ours.encode(text), text  # no bos/eos added, one id per byte
        assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (256, 257, 258)
    assert conf["torch_dtype"] == "float32" and conf["use_cache"] is True


@pytest.mark.parametrize("dtype,shard", [("fp32", None), ("bf16", "2MB")])
def test_folder_loads_with_our_logits_sharded_and_in_bf16(tmp_path, dtype, shard):
    from jaxlm.api import logits as jax_logits

    cfg = load_config(TINY)
    weights = init_weights(cfg.model, 3)
    kw = {"max_shard_bytes": parse_size(shard)} if shard else {}
    out = write_hf_folder(tmp_path / "hf", weights, cfg.model, ByteTokenizer(), dtype=dtype,
                          **kw)
    files = sorted(p.name for p in out.iterdir())
    if shard:
        index = json.loads((out / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and all(s in files for s in shards)
        assert "model.safetensors" not in files
    else:
        assert "model.safetensors" in files
    tok, model = _hf(out)
    if dtype == "bf16":  # the stored values are the bf16 roundings torch makes
        name = "model.layers.0.mlp.up_proj.weight"
        got = model.state_dict()[name].numpy()
        want = torch.from_numpy(weights[name]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got, want)
        weights = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy()
                   for k, v in weights.items()}
    ids = tok(TEXTS[0]).input_ids
    ref = jax_logits(cfg, weights, np.asarray([ids]), "fp32")[0]
    got = _hf_logits(model, ids)
    assert np.abs(got - ref).max() <= LOGITS_ATOL


def test_export_refuses_a_non_empty_out_and_bad_sizes(tmp_path):
    cfg = load_config(TINY)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        write_hf_folder(tmp_path / "hf", init_weights(cfg.model, 0), cfg.model,
                        ByteTokenizer())
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left behind
    for bad in ("five", "0", "-1GB"):
        with pytest.raises(UserError, match="size"):
            parse_size(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 1024**2


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow  # trains and exports in subprocesses (~45 s); CI runs it
def test_jaxlm_train_export_then_transformers_generates_the_same(tmp_path):
    from jaxlm.api import logits as jax_logits
    from jaxlm.generate import generate_from_checkpoint, load_params
    from jaxlm.weights import params_to_hf

    run = tmp_path / "run"
    _run([sys.executable, "-m", "jaxlm.cli", "train", str(TINY), f"train.out_dir={run}",
          "train.steps=12", "train.eval_every=0", "--no-progress"])
    _run([sys.executable, "-m", "jaxlm.cli", "export", str(run), "--out",
          str(tmp_path / "hf")])
    assert _tb_tags(run / "tb") == TB_TAGS
    tok, model = _hf(tmp_path / "hf")
    cfg, params, step = load_params(run)
    assert step == 12
    weights = {k: np.asarray(v) for k, v in
               params_to_hf(params, cfg.model, cfg.train.scan_layers).items()}
    prompt = "import os\nimport sys\n"
    ids = tok(prompt).input_ids
    diff = np.abs(_hf_logits(model, ids)
                  - jax_logits(cfg, weights, np.asarray([ids]), "fp32")[0]).max()
    print(f"exported jaxlm checkpoint: max |logits_hf - logits_jax| = {diff:.2e}")
    assert diff <= LOGITS_ATOL
    ours = generate_from_checkpoint(run, prompt, max_new_tokens=20)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None)
    assert tok.decode(out[0]) == ours


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchlm_train_export_folder_loads_with_its_logits(tmp_path):
    from torchlm.api import logits as torch_logits
    from torchlm.export import checkpoint_weights

    run = tmp_path / "run"
    _run([sys.executable, "-m", "torchlm.cli", "train", str(TINY), f"train.out_dir={run}",
          "train.steps=3", "train.eval_every=0", "zero.stage=1", "--no-progress"])
    _run([sys.executable, "-m", "torchlm.cli", "export", str(run), "--out",
          str(tmp_path / "hf")])
    assert _tb_tags(run / "tb") == TB_TAGS  # the same tags as jaxlm's runs
    tok, model = _hf(tmp_path / "hf")
    cfg = load_config(run / "config.yaml")
    weights = checkpoint_weights(run)
    ids = tok(TEXTS[1]).input_ids
    ref = torch_logits(cfg, weights, np.asarray([ids]), "fp32")[0]
    assert np.abs(_hf_logits(model, ids) - ref).max() <= LOGITS_ATOL
    meta = json.loads((tmp_path / "hf" / "lmspec_export.json").read_text())
    assert meta["framework"] == "torchlm" and meta["tag"].startswith("step")


@pytest.mark.slow
def test_hf_folder_in_jaxlm_train_and_out_again(tmp_path):
    """A folder transformers wrote (bf16, sharded) -> `jaxlm train model.from_hf=DIR
    --init-weights DIR` (lr 0: the weights stay) -> `jaxlm export` -> the same weights
    and logits as the folder we started from."""
    from dataclasses import replace

    from torchlm.api import hf_model

    cfg = load_config(TINY)
    model_cfg = replace(cfg.model, hidden_size=128, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=320)
    src = tmp_path / "src"
    model = hf_model(model_cfg, init_weights(model_cfg, 5)).to(torch.bfloat16)
    model.save_pretrained(str(src), max_shard_size="400KB")
    assert (src / INDEX_FILE).is_file()  # sharded, as transformers shards
    run, out = tmp_path / "run", tmp_path / "out"
    _run([sys.executable, "-m", "jaxlm.cli", "train", str(TINY), f"model.from_hf={src}",
          "--init-weights", str(src), f"train.out_dir={run}", "train.steps=2",
          "optim.lr=0", "train.eval_every=0", "--no-progress"])
    saved = load_config(run / "config.yaml")
    assert saved.model == model_cfg  # the model section came from config.json
    _run([sys.executable, "-m", "jaxlm.cli", "export", str(run), "--out", str(out)])
    from lmspec.hf import read_weights

    a, b = read_weights(src), read_weights(out)
    assert sorted(a) == sorted(b)
    for k in a:  # bf16 in, fp32 masters unchanged by lr 0, fp32 out: exact
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m_src = transformers.LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    tok, m_out = _hf(out)
    ids = tok(TEXTS[0]).input_ids
    diff = np.abs(_hf_logits(m_src.eval(), ids) - _hf_logits(m_out, ids)).max()
    print(f"HF -> jaxlm -> HF round trip: max |logits difference| = {diff:.1e}")
    assert diff == 0.0


def test_init_weights_folder_of_another_model_names_every_difference(tmp_path):
    from dataclasses import replace

    from lmspec.hf import load_init_weights

    cfg = load_config(TINY)
    other = replace(cfg.model, hidden_size=128, num_attention_heads=4, vocab_size=300)
    write_hf_folder(tmp_path / "hf", init_weights(other, 0), other, ByteTokenizer())
    with pytest.raises(UserError) as e:
        load_init_weights(tmp_path / "hf", cfg.model)
    msg = str(e.value)
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        assert f"model.{key}=" in msg and f"config.json {key}=" in msg, msg
    assert "intermediate_size" not in msg  # only what differs
    with pytest.raises(UserError, match="without config.json"):
        (tmp_path / "empty").mkdir()
        load_init_weights(tmp_path / "empty", cfg.model)
    assert load_config(TINY, [f"model.from_hf={tmp_path / 'hf'}"]).model == other


def test_exported_folder_is_a_tokenizer_for_training(tmp_path):
    """data.tokenizer=<a Hugging Face folder>: its tokenizer.json, the same ids."""
    from lmspec.tokenizer import load_tokenizer

    cfg = load_config(TINY)
    write_hf_folder(tmp_path / "hf", init_weights(cfg.model, 0), cfg.model, ByteTokenizer())
    assert load_config(TINY, [f"data.tokenizer={tmp_path / 'hf'}"])  # accepted
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert [tok.encode(t) for t in TEXTS] == [ByteTokenizer().encode(t) for t in TEXTS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))

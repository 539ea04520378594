"""Hugging Face model folders, written without torch or transformers.

:func:`write_hf_folder` turns fp32 weights with Hugging Face Llama names (what both
trainers hold) into what ``LlamaForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load, offline:

- ``config.json``: a ``LlamaConfig`` of the model section, the tokenizer's bos/eos/pad
  ids, ``torch_dtype``;
- ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``max_shard_bytes`` (as ``save_pretrained``
  does), in fp32, bf16 (rounded to nearest even) or fp16;
- ``generation_config.json``;
- the tokenizer: ``tokenizer.json`` (the byte tokenizer as a byte-level BPE without merges,
  so that every byte is its own id as in :class:`lmspec.tokenizer.ByteTokenizer`; a
  trained BPE as it is), ``tokenizer_config.json`` and ``special_tokens_map.json``.

The folder is written beside its destination and renamed into place: an interrupted
export leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.config import ModelConfig
from lmspec.errors import UserError
from lmspec.tokenizer import BOS, EOS, PAD, ByteTokenizer, HFTokenizer, Tokenizer

DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"),
          "fp16": ("F16", "float16")}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # save_pretrained's default ("5GB")
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (UserError otherwise)."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2,
             "GB": 1000**3, "B": 1}
    unit = next((u for u in units if t.endswith(u)), "")
    num, mult = (t[: -len(unit)], units[unit]) if unit else (t, 1)
    try:
        value = float(num)
    except ValueError:
        raise UserError(f"size {text!r}: expected e.g. 5GB, 500MB or a byte count") from None
    if not value > 0:
        raise UserError(f"size {text!r} must be > 0")
    return int(value * mult)


def config_dict(model: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with this model and tokenizer."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_key_value_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": model.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": getattr(tokenizer, "pad_id", None),
        "torch_dtype": DTYPES[dtype][1],
        "use_cache": True,
    }


def generation_config_dict(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": getattr(tokenizer, "pad_id", None), "do_sample": False}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte as one printable character (the mapping
    the ``tokenizers`` ByteLevel pre-tokenizer and decoder use)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def byte_tokenizer_json(tok: ByteTokenizer) -> dict[str, Any]:
    """``tokenizer.json`` equal to the byte tokenizer: ids 0-255 the UTF-8 bytes, then
    bos, eos, pad as special tokens; nothing added when encoding."""
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    specials = [(tok.bos_id, BOS), (tok.eos_id, EOS), (tok.pad_id, PAD)]
    for i, name in specials:
        vocab[name] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, name in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _token_name(tokenizer: Tokenizer, i: int | None) -> str | None:
    if i is None:
        return None
    if isinstance(tokenizer, ByteTokenizer):
        return {tokenizer.bos_id: BOS, tokenizer.eos_id: EOS, tokenizer.pad_id: PAD}[i]
    return tokenizer._tok.id_to_token(i)  # type: ignore[attr-defined]


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    if isinstance(tokenizer, ByteTokenizer):
        (folder / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(tokenizer)))
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, folder / "tokenizer.json")
    else:  # pragma: no cover - every tokenizer is one of the two
        raise UserError(f"cannot export tokenizer {tokenizer.spec!r}")
    names = {"bos_token": _token_name(tokenizer, tokenizer.bos_id),
             "eos_token": _token_name(tokenizer, tokenizer.eos_id),
             "pad_token": _token_name(tokenizer, getattr(tokenizer, "pad_id", None))}
    names = {k: v for k, v in names.items() if v is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, **names}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _as_dtype(a: np.ndarray, dtype: str) -> tuple[bytes, str]:
    """Raw little-endian bytes of ``a`` in ``dtype`` and the safetensors dtype name."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "fp32":
        return a.astype("<f4").tobytes(), "F32"
    if dtype == "fp16":
        return a.astype("<f2").tobytes(), "F16"
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # nearest even
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded.astype("<u2").tobytes(), "BF16"


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], dtype: str) -> int:
    """One safetensors file (``{"format": "pt"}`` metadata, as transformers expects);
    the number of tensor bytes written."""
    blobs, header, offset = [], {}, 0
    for name in sorted(tensors):
        raw, st = _as_dtype(tensors[name], dtype)
        header[name] = {"dtype": st, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    return offset


def _shards(weights: Mapping[str, np.ndarray], itemsize: int, max_bytes: int
            ) -> list[list[str]]:
    """Names split into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(weights):
        n = weights[name].size * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_hf_folder(out: str | os.PathLike, weights: Mapping[str, np.ndarray],
                    model: ModelConfig, tokenizer: Tokenizer, *, dtype: str = "fp32",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write the folder (see the module docstring); refuses an ``out`` that exists and is
    not empty. ``extra``: more JSON files, name -> content (e.g. where the export came
    from)."""
    from lmspec.weights import check_names

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another "
                        "or remove it")
    check_names(model, dict(weights), "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        itemsize = 4 if dtype == "fp32" else 2
        shards = _shards(weights, itemsize, max_shard_bytes)
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", weights, dtype)
        else:
            weight_map, total = {}, 0
            for k, names in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                total += _write_safetensors(tmp / fname, {n: weights[n] for n in names}, dtype)
                weight_map.update(dict.fromkeys(names, fname))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(
            json.dumps(config_dict(model, tokenizer, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config_dict(tokenizer), indent=2) + "\n")
        write_tokenizer(tokenizer, tmp, model.max_position_embeddings)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        from lmspec.io import umask

        mode = 0o777 & ~umask()
        tmp.chmod(mode)
        for f in tmp.iterdir():
            f.chmod(mode & 0o666)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out



# ----------------------------------------------------------------------------- reading

# the model section's keys, as config.json names them
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "rope_theta", "rms_norm_eps", "tie_word_embeddings")
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a Llama folder; a UserError when it is missing, not JSON, not a
    Llama or uses a feature our model does not have (named)."""
    from lmspec.io import read_json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (a Hugging Face model folder has one)")
    conf = read_json(path, "JSON file")
    if not isinstance(conf, dict):
        raise UserError(f"{path}: not a JSON object")
    kind = conf.get("model_type")
    if kind != "llama":
        raise UserError(f"{path}: model_type {kind!r}; only 'llama' (LlamaForCausalLM) "
                        "folders map onto this model")
    unsupported = []
    if conf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={conf['hidden_act']!r} (ours: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if conf.get(key):
            unsupported.append(f"{key}=true (ours: no biases)")
    scaling = conf.get("rope_scaling") or (conf.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else None
    if rope_type not in (None, "default"):
        unsupported.append(f"rope scaling {rope_type!r} (ours: plain RoPE)")
    hidden, heads = conf.get("hidden_size"), conf.get("num_attention_heads")
    if conf.get("head_dim") not in (None, (hidden // heads) if hidden and heads else None):
        unsupported.append(f"head_dim={conf['head_dim']} != hidden_size / "
                           f"num_attention_heads (ours derives it)")
    if unsupported:
        raise UserError(f"{path}: {'; '.join(unsupported)}")
    return conf


def model_values(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The model section's values from a ``config.json`` (LlamaConfig's defaults where a
    key is absent)."""
    rope = conf.get("rope_theta")
    if rope is None:
        rope = (conf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    out = {k: conf[k] for k in MODEL_KEYS if k in conf and k != "rope_theta"}
    out["rope_theta"] = float(rope)
    out.setdefault("num_key_value_heads", conf.get("num_attention_heads"))
    out.setdefault("tie_word_embeddings", False)
    missing = [k for k in MODEL_KEYS if out.get(k) is None and k not in
               ("max_position_embeddings", "rms_norm_eps")]
    if missing:
        raise UserError(f"config.json lacks {missing}")
    return {k: v for k, v in out.items() if v is not None}


def check_config(model: ModelConfig, conf: Mapping[str, Any], where: str) -> None:
    """A UserError naming every key where ``config.json`` and the model section differ
    (``model.from_hf=DIR`` takes them all from the folder)."""
    diffs = [f"model.{k}={getattr(model, k)!r} but config.json {k}={v!r}"
             for k, v in model_values(conf).items() if getattr(model, k) != v]
    if diffs:
        raise UserError(f"{where}: the folder's config.json is another model: "
                        + "; ".join(diffs) + " (model.from_hf=DIR takes the folder's values)")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as fp32 numpy (F32, F16, BF16, F64), read
    without torch; a UserError naming the file when it is not a complete safetensors
    file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(data[8:8 + n])
        body = memoryview(data)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = info["dtype"]
            if dt not in _ST_DTYPES:
                raise ValueError(f"tensor {name}: dtype {dt} (expected F32, F16, BF16, F64)")
            a, b = info["data_offsets"]
            if b > len(body):
                raise ValueError(f"tensor {name} runs past the end (truncated?)")
            raw = np.frombuffer(body[a:b], dtype=_ST_DTYPES[dt])
            if dt == "BF16":
                arr = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                arr = raw.astype(np.float32)
            out[name] = arr.reshape(info["shape"])
        return out
    except OSError as e:
        raise UserError(f"weights file {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"weights file {path} is not a readable safetensors file ({e}); is "
                        "it truncated or another format?") from None


def read_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """fp32 weights of a folder: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names (each checked to exist)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        out: dict[str, np.ndarray] = {}
        for fname in sorted(set(weight_map.values())):
            shard = read_safetensors(folder / fname)
            out.update({k: v for k, v in shard.items() if weight_map.get(k) == fname})
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise UserError(f"{index} names tensors its shards do not hold: {missing[:5]}")
        return out
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder}: neither model.safetensors nor {INDEX_FILE}")
    return read_safetensors(single)


def load_init_weights(path: str | os.PathLike, model: ModelConfig) -> dict[str, np.ndarray]:
    """``--init-weights``: a safetensors file or a Hugging Face folder (its config.json
    checked against ``model``, naming every difference), fp32/bf16/fp16 tensors, names
    and shapes checked strictly; fp32 numpy out."""
    from lmspec.weights import check_names

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"--init-weights {p}: a folder without config.json; give a "
                            "Hugging Face model folder or a .safetensors file")
        check_config(model, read_config(p), f"--init-weights {p}")
        weights = read_weights(p)
    elif p.is_file():
        weights = read_safetensors(p)
    else:
        from lmspec.errors import UserFileNotFoundError

        raise UserFileNotFoundError(f"weights file not found: {p} (--init-weights takes a "
                                    ".safetensors file or a Hugging Face model folder)")
    check_names(model, weights, f"--init-weights {p}")
    return weights

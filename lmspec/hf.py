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
        mode = 0o777 & ~_umask()
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

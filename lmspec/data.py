"""Data pipeline: corpus -> token cache -> deterministic global batches.

A corpus (``data.source``; the ``hf-*`` kinds are read by :mod:`lmspec.data_hf`
through Hugging Face ``datasets``) is read as a list of documents, tokenized once and joined
with the tokenizer's eos id into one token stream, cached on disk as a memmap
(``tokens.bin``, uint16 when the vocabulary fits, else uint32) plus ``manifest.json``,
in a folder keyed by the content hash (source hash, tokenizer hash, ``max_bytes``).
The token file is written first and the manifest last, both by atomic rename, so a
killed build leaves nothing that a later build takes as valid. The manifest records the
token file's sha256, checked on every load: a cache whose manifest is there but does not
match its token file (size, dtype, contents) is refused with an error naming the file,
never used and never rebuilt over (delete the folder to rebuild it).

The last ``val_fraction`` of the stream is the validation split. Train and validation
are cut into non-overlapping windows of ``seq_len + 1`` tokens. Sample ``i = step * B +
j`` (B = ``train.global_batch_size``) of the training order is window
``perm(seed, epoch)[i % W]`` with ``epoch = i // W`` and W windows per epoch: a pure
function of (seed, step), reshuffled every epoch, so resuming needs only the step.

Imports neither jax nor torch.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmspec import integrity
from lmspec.config import DataConfig, ExperimentConfig
from lmspec.data_hf import HF_KINDS, read_hf
from lmspec.errors import UserError, UserFileNotFoundError
from lmspec.io import atomic_write, atomic_write_json, file_lock
from lmspec.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    parse_bpe_size,
)

FORMAT_VERSION = 1
TOKEN_FILE = "tokens.bin"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# corpora above this size get a progress bar while they are read and tokenized
PROGRESS_BYTES = 4 << 20
SOURCE_KINDS = ("stdlib", "text", "dir", "glob", "jsonl", "tokens", *HF_KINDS)
# the kinds whose records have fields (data.text_field) and the kinds with splits
RECORD_KINDS = ("jsonl", *HF_KINDS)

__all__ = ["Dataset", "fingerprint", "row_digests", "combine_row_digests",
           "batch_fingerprint", "fingerprint_parts", "build_token_cache", "read_corpus", "Corpus"]


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(array: Any) -> str:
    """16 hex chars identifying an array's shape and values, stable across processes,
    machines and integer dtypes (an int32 and an int64 copy of a batch agree).

    Integers (and bools) are hashed as little-endian int64, floats as little-endian
    values of their own width; accepts numpy arrays and anything ``np.asarray`` takes.
    """
    a = np.asarray(array)
    if a.dtype.kind in "biu":
        canon = a.astype("<i8")
        kind = "int"
    elif a.dtype.kind == "f":
        canon = a.astype(a.dtype.newbyteorder("<"))
        kind = canon.dtype.str
    else:
        raise TypeError(f"fingerprint: unsupported dtype {a.dtype}; expected integers or floats")
    h = hashlib.sha256()
    h.update(f"{kind}:{a.shape}:".encode())
    h.update(np.ascontiguousarray(canon).tobytes())
    return h.hexdigest()[:16]


def row_digests(rows: Any) -> np.ndarray:
    """One 64-bit digest per token row (the last axis is the row), as ``uint64``.

    Each side of a parity run hashes the rows it actually fed to the model (per rank or
    device and micro-step), gathers these digests in global row order and logs
    :func:`combine_row_digests` of them: a row fed twice, skipped or shifted on one rank
    changes the logged fingerprint. Values are hashed as little-endian int64, so int32 and
    int64 copies of a row agree.
    """
    a = np.asarray(rows)
    if a.dtype.kind not in "biu":
        raise TypeError(f"row_digests: expected integer token rows, got dtype {a.dtype}")
    a = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).astype("<i8"))
    out = np.empty(a.shape[0], dtype=np.uint64)
    for i, row in enumerate(a):
        out[i] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
    return out


def combine_row_digests(digests: Any) -> str:
    """16 hex chars for a global batch given its rows' :func:`row_digests` in global row
    order (micro-step major, then rank or device, then row)."""
    d = np.ascontiguousarray(np.asarray(digests, dtype=np.uint64).reshape(-1)).astype("<u8")
    h = hashlib.sha256(f"rows:{d.shape[0]}:".encode())
    h.update(d.tobytes())
    return h.hexdigest()[:16]


def fingerprint_parts(digests: Any, rows_per_part: int) -> list[str]:
    """:func:`combine_row_digests` of each run of ``rows_per_part`` consecutive rows of a
    global batch (given its row digests in global row order).

    With ``rows_per_part = train.micro_batch_size`` part ``k`` is what DeepSpeed rank
    ``k % world_size`` fed at micro-step ``k // world_size``; both trainers log these as
    ``batch_fingerprint_parts``, so a mismatch names the micro-step and rank."""
    d = np.asarray(digests, dtype=np.uint64).reshape(-1)
    if rows_per_part < 1 or d.shape[0] % rows_per_part:
        raise ValueError(f"fingerprint_parts: {d.shape[0]} rows do not split into parts of "
                         f"{rows_per_part}")
    return [combine_row_digests(d[i:i + rows_per_part])
            for i in range(0, d.shape[0], rows_per_part)]


def batch_fingerprint(global_batch: Any) -> str:
    """The fingerprint a trainer logs for ``global_batch`` (rows in global order):
    ``combine_row_digests(row_digests(global_batch))``."""
    return combine_row_digests(row_digests(global_batch))


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Corpus:
    """Documents read from a source, as UTF-8 bytes (already cut to ``max_bytes``)."""

    kind: str
    location: str
    documents: list[bytes]
    skipped: int  # files left out: binary or not UTF-8
    hash: str  # sha256 of the document contents and boundaries

    @property
    def num_bytes(self) -> int:
        return sum(len(d) for d in self.documents)

    def texts(self) -> list[str]:
        return [d.decode("utf-8") for d in self.documents]


def source_kind(source: str) -> tuple[str, str]:
    """(kind, location) of ``data.source``; a ``kind:`` prefix forces the kind (the
    ``hf-*`` kinds are chosen by their prefix only)."""
    for kind in ("text", "glob", "jsonl", "tokens", *HF_KINDS):
        if source.startswith(kind + ":"):
            return kind, source[len(kind) + 1:]
    if source == "stdlib":
        return "stdlib", sysconfig.get_paths()["stdlib"]
    if any(c in source for c in "*?["):
        return "glob", source
    p = Path(source)
    if not p.exists():
        raise UserFileNotFoundError(
            f"data.source={source!r}: no such file or directory (allowed: 'stdlib', a text "
            "file, a directory, a glob, a .jsonl file, a token manifest.json/.bin, or "
            "hf-disk:, hf-parquet:, hf-json:, hf-text: with a path)"
        )
    if p.is_dir():
        return "dir", source
    if p.name == MANIFEST or p.suffix == ".bin":
        return "tokens", source
    if p.suffix == ".jsonl":
        return "jsonl", source
    return "text", source


def _stdlib_files(root: Path) -> list[Path]:
    """The ``.py`` files under ``root`` outside installed packages and caches, sorted by
    relative path. ``os.walk`` prunes the excluded folders instead of listing them and
    filtering (the interpreter's site-packages alone can hold 10x the stdlib's files);
    like ``Path.rglob``, it does not descend into symlinked folders."""
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded]
        files += [p for n in names if n.endswith(".py") and (p := Path(folder, n)).is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _decode_file(data: bytes) -> bytes | None:
    """``data`` if it is UTF-8 text, else None (binary or another encoding)."""
    if b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _read_files(files: list[Path], progress: bool, max_bytes: int = 0
                ) -> tuple[list[bytes], int]:
    """UTF-8 files as documents, and the number skipped; stops once ``max_bytes`` (> 0)
    bytes are read, since later files would be cut away anyway."""
    from tqdm import tqdm

    docs: list[bytes] = []
    skipped = 0
    total = 0
    for p in tqdm(files, desc="reading", unit="file", disable=not progress, file=sys.stderr):
        d = _decode_file(p.read_bytes())
        if d is None:
            skipped += 1
        elif d:
            docs.append(d)
            total += len(d)
            if 0 < max_bytes <= total:
                break
    return docs, skipped


def _read_jsonl(path: Path, source: str, field: str = "text") -> list[bytes]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"data.source={source!r}: {path}:{lineno}: not valid JSON ({e.msg})"
                ) from None
            if not isinstance(rec, dict) or field not in rec:
                raise UserError(
                    f"data.source={source!r}: {path}:{lineno}: record has no {field!r} field"
                    + (" (data.text_field names the field to read)" if field == "text" else "")
                )
            if not isinstance(rec[field], str):
                raise UserError(
                    f"data.source={source!r}: {path}:{lineno}: {field!r} must be a string, "
                    f"got {type(rec[field]).__name__}"
                )
            if rec[field]:
                docs.append(rec[field].encode("utf-8"))
    return docs


def _truncate(docs: list[bytes], max_bytes: int) -> list[bytes]:
    """The first ``max_bytes`` bytes of the documents, cut at a character boundary."""
    if max_bytes <= 0:
        return docs
    out, total = [], 0
    for d in docs:
        if total + len(d) <= max_bytes:
            out.append(d)
            total += len(d)
            continue
        head = d[: max_bytes - total].decode("utf-8", errors="ignore").encode("utf-8")
        if head:
            out.append(head)
        break
    return out


def _outside(files: list[Path], cache_dir: Path) -> list[Path]:
    """``files`` without those in the token cache (a source folder may contain it; its
    manifests change with every build and would change the corpus)."""
    cache = cache_dir.resolve()
    return [p for p in files if not p.resolve().is_relative_to(cache)]


def _hash_documents(docs: list[bytes]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(len(d).to_bytes(8, "little"))
        h.update(d)
    return h.hexdigest()


def _check_record_keys(data: DataConfig, kind: str) -> None:
    """``data.text_field`` and ``data.split`` set away from their defaults only for the
    kinds that use them."""
    default = DataConfig()
    where = {"text_field": RECORD_KINDS, "split": tuple(HF_KINDS)}
    for key, kinds in where.items():
        value = getattr(data, key)
        if value != getattr(default, key) and kind not in kinds:
            raise UserError(
                f"data.{key}={value!r} applies only to data.source kinds {list(kinds)}, not to "
                f"data.source={data.source!r} ({kind}); leave it at "
                f"{getattr(default, key)!r}"
            )


def read_corpus(data: DataConfig, progress: bool | None = None) -> Corpus:
    """Read the documents of a text source (every kind but ``tokens``)."""
    kind, loc = source_kind(data.source)
    src = data.source
    _check_record_keys(data, kind)
    skipped = 0
    if kind == "stdlib":
        files = _stdlib_files(Path(loc))
        docs, skipped = _read_files(files, bool(progress), data.max_bytes)
    elif kind == "text":
        p = Path(loc)
        if not p.is_file():
            raise UserFileNotFoundError(f"data.source={src!r}: no such file {p}")
        raw = p.read_bytes()
        if _decode_file(raw) is None:
            raise UserError(f"data.source={src!r}: {p} is not UTF-8 text")
        docs = [raw] if raw else []
    elif kind == "dir":
        root = Path(loc)
        files = sorted((p for p in root.rglob("*") if p.is_file()),
                       key=lambda p: p.relative_to(root).as_posix())
        files = _outside(files, Path(data.cache_dir))
        docs, skipped = _read_files(files, bool(progress), data.max_bytes)
    elif kind == "glob":
        files = sorted(Path(p) for p in _glob.glob(loc, recursive=True) if Path(p).is_file())
        files = _outside(files, Path(data.cache_dir))
        if not files:
            raise UserFileNotFoundError(f"data.source={src!r}: the pattern matches no files")
        docs, skipped = _read_files(files, bool(progress), data.max_bytes)
    elif kind == "jsonl":
        p = Path(loc)
        if not p.is_file():
            raise UserFileNotFoundError(f"data.source={src!r}: no such file {p}")
        docs = _read_jsonl(p, src, data.text_field)
    elif kind in HF_KINDS:
        docs = read_hf(kind, loc, data, bool(progress))
    else:
        raise UserError(f"data.source={src!r}: a token file has no text to read")
    docs = _truncate(docs, data.max_bytes)
    if not docs:
        extra = f" ({skipped} binary or non-UTF-8 files skipped)" if skipped else ""
        raise UserError(f"data.source={src!r}: the corpus is empty{extra}")
    return Corpus(kind=kind, location=loc, documents=docs, skipped=skipped,
                  hash=_hash_documents(docs))


# ----------------------------------------------------------------------------- token cache


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _cache_key(source_hash: str, tokenizer_hash: str, max_bytes: int) -> str:
    text = f"v{FORMAT_VERSION}|{source_hash}|{tokenizer_hash}|{max_bytes}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_todo(folder: Path) -> str:
    return (f"the token cache {folder} is corrupt: delete that folder to rebuild it "
            "(nothing was changed)")


def _check_token_file(manifest_path: Path, manifest: dict[str, Any], todo: str) -> None:
    """The token file a manifest describes: the dtype allowed (and, for a cache built
    here, the one its vocabulary needs), the size it implies, and its sha256 when the
    manifest records one. Raises :class:`UserError` naming the file and ending ``todo``."""
    dtype = manifest.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{manifest_path}: dtype {dtype!r} (allowed: uint16, uint32); {todo}")
    if manifest.get("format") == "lmspec-tokens" and "vocab_size" in manifest \
            and dtype != token_dtype(int(manifest["vocab_size"])).name:
        raise UserError(f"{manifest_path}: dtype {dtype} does not match vocab_size "
                        f"{manifest['vocab_size']}, which this version stores as "
                        f"{token_dtype(int(manifest['vocab_size'])).name}; {todo}")
    tok = manifest_path.parent / str(manifest.get("token_file", TOKEN_FILE))
    if not tok.is_file():
        raise UserError(f"{tok}: missing (described by {manifest_path}); {todo}")
    expected = int(manifest["num_tokens"]) * np.dtype(dtype).itemsize
    size = tok.stat().st_size
    if size != expected:
        raise UserError(f"{tok}: {size} bytes, but {manifest_path} says {manifest['num_tokens']} "
                        f"{dtype} tokens ({expected} bytes); {todo}")
    digest = manifest.get("sha256")
    if digest is not None and integrity.file_sha256(tok) != digest:
        raise UserError(f"{tok}: contents changed since it was written (sha256 differs from "
                        f"{manifest_path}); {todo}")


def _manifest_valid(folder: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest in ``folder`` after checking its token file (size, dtype, sha256);
    None when there is no manifest (never built, or a build was killed before its end).
    A manifest that is there but wrong is a :class:`UserError`: the cache is refused, not
    rebuilt over, so the bad files stay for inspection."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    todo = _cache_todo(folder)
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        int(manifest["num_tokens"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a valid token manifest ({e}); {todo}") from None
    wrong = [k for k, v in expect.items() if manifest.get(k) != v]
    if wrong:
        raise UserError(f"{path}: fields {wrong} do not match this cache key; {todo}")
    _check_token_file(path, manifest, todo)
    if "sha256" not in manifest:
        print(f"warning: {path} has no sha256 of its tokens (written by an older version); "
              f"delete {folder} to rebuild it with one", file=sys.stderr)
    return manifest


def _encode(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype,
            progress: bool) -> np.ndarray:
    """Tokens of all documents joined with eos, without a Python loop per byte."""
    from tqdm import tqdm

    bar = tqdm(total=corpus.num_bytes, desc="tokenizing", unit="B", unit_scale=True,
               disable=not progress, file=sys.stderr)
    eos = tokenizer.eos_id
    docs = corpus.documents
    if isinstance(tokenizer, ByteTokenizer):
        out = np.empty(corpus.num_bytes + len(docs) - 1, dtype=dtype)
        pos = 0
        for i, d in enumerate(docs):
            out[pos:pos + len(d)] = np.frombuffer(d, dtype=np.uint8)
            pos += len(d)
            if i < len(docs) - 1:
                out[pos] = eos
                pos += 1
            bar.update(len(d))
        bar.close()
        assert pos == len(out)
        return out
    parts: list[np.ndarray] = []
    sep = np.asarray([eos], dtype=np.int64)
    chunk = 64
    for start in range(0, len(docs), chunk):
        batch = docs[start:start + chunk]
        for ids in tokenizer.encode_batch([d.decode("utf-8") for d in batch]):
            if parts:
                parts.append(sep)
            parts.append(ids)
        bar.update(sum(len(d) for d in batch))
    bar.close()
    ids = np.concatenate(parts)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise UserError(f"data.tokenizer={tokenizer.spec!r} produced ids outside its vocabulary")
    return ids.astype(dtype)


def _check_vocab(tokenizer_spec: str, vocab_size: int, model_vocab_size: int | None) -> None:
    if model_vocab_size is not None and vocab_size > model_vocab_size:
        raise UserError(
            f"data.tokenizer={tokenizer_spec!r} has {vocab_size} tokens, more than "
            f"model.vocab_size={model_vocab_size}"
        )


def build_token_cache(data: DataConfig, progress: bool | None = None,
                      model_vocab_size: int | None = None
                      ) -> tuple[Path, dict[str, Any], Tokenizer]:
    """Tokenize a text source into the cache, or find the matching earlier build.

    Returns (cache folder, manifest, tokenizer). ``progress`` None shows a progress bar
    for corpora over 4 MiB. A tokenizer larger than ``model_vocab_size`` is an error
    raised before anything is written.
    """
    if data.tokenizer.startswith("bpe:"):  # known before training it
        _check_vocab(data.tokenizer, parse_bpe_size(data.tokenizer), model_vocab_size)
    corpus = read_corpus(data, progress=False if progress is None else progress)
    show = progress if progress is not None else corpus.num_bytes > PROGRESS_BYTES
    cache_dir = Path(data.cache_dir)
    tokenizer = load_tokenizer(data.tokenizer, corpus=_LazyTexts(corpus),
                               corpus_hash=corpus.hash, cache_dir=cache_dir, progress=show)
    _check_vocab(tokenizer.spec, tokenizer.vocab_size, model_vocab_size)
    key = _cache_key(corpus.hash, tokenizer.hash, data.max_bytes)
    folder = cache_dir / "tokens" / key
    expect = {
        "format_version": FORMAT_VERSION,
        "source_hash": corpus.hash,
        "tokenizer_hash": tokenizer.hash,
        "max_bytes": data.max_bytes,
    }
    manifest = _manifest_valid(folder, expect)
    if manifest is not None:
        return folder, manifest, tokenizer
    with file_lock(cache_dir / "tokens" / f".{key}.lock"):
        manifest = _manifest_valid(folder, expect)  # built by another process meanwhile?
        if manifest is not None:
            return folder, manifest, tokenizer
        dtype = token_dtype(tokenizer.vocab_size)
        tokens = _encode(corpus, tokenizer, dtype, show)
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(tokenizer, HFTokenizer):
            # a copy beside the tokens, so the folder works as a `tokens:` source alone
            atomic_write(folder / TOKENIZER_FILE,
                         lambda tmp: shutil.copyfile(tokenizer.path, tmp))
        atomic_write(folder / TOKEN_FILE, tokens.tofile)
        # the checksum of what is on disk (what a later run will read and compare)
        digest = integrity.file_sha256(folder / TOKEN_FILE)
        manifest = {
            **expect,
            "format": "lmspec-tokens",
            "source": data.source,
            "source_kind": corpus.kind,
            "num_documents": len(corpus.documents),
            "skipped_files": corpus.skipped,
            "num_bytes": corpus.num_bytes,
            "tokenizer": tokenizer.spec,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "num_tokens": int(tokens.size),
            "dtype": dtype.name,
            "token_file": TOKEN_FILE,
            "sha256": digest,
        }
        # the manifest goes last: without it the token file is never taken as valid
        atomic_write_json(folder / MANIFEST, manifest)
    return folder, manifest, tokenizer


class _LazyTexts:
    """Documents decoded one at a time, for BPE training without a second full copy."""

    def __init__(self, corpus: Corpus) -> None:
        self._docs = corpus.documents

    def __iter__(self):
        for d in self._docs:
            yield d.decode("utf-8")

    def __len__(self) -> int:
        return len(self._docs)


class _VocabOnlyTokenizer(Tokenizer):
    """Stands in for the tokenizer of a token file built elsewhere: ids only."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.spec = str(manifest.get("tokenizer", "unknown"))
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_id = int(manifest["eos_id"])
        self.bos_id = int(manifest.get("bos_id", self.eos_id))
        self.pad_id = None
        self.hash = str(manifest.get("tokenizer_hash", ""))

    def encode(self, text: str) -> list[int]:
        raise UserError(f"the tokenizer {self.spec!r} of this token file is not available")

    def decode(self, ids: Any) -> str:
        raise UserError(f"the tokenizer {self.spec!r} of this token file is not available")


def open_token_file(data: DataConfig) -> tuple[Path, dict[str, Any], Tokenizer]:
    """A pre-tokenized source: ``tokens:<folder|manifest.json|file.bin>``.

    Its tokenizer is the one its manifest names (``data.tokenizer`` is not used):
    ``byte``, the ``tokenizer.json`` beside the manifest, or else ids only.
    """
    kind, loc = source_kind(data.source)
    src = data.source
    _check_record_keys(data, kind)
    if data.max_bytes:
        raise UserError(
            f"data.max_bytes={data.max_bytes}: applies to text sources only, not to the token "
            f"file data.source={src!r}; set it to 0"
        )
    p = Path(loc)
    if p.is_dir():
        p = p / MANIFEST
    manifest_path = p if p.suffix != ".bin" else p.parent / MANIFEST
    if not p.exists():
        raise UserFileNotFoundError(f"data.source={src!r}: no such file {p}")
    if not manifest_path.is_file():
        raise UserFileNotFoundError(
            f"data.source={src!r}: token file {p} has no {MANIFEST} beside it"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"data.source={src!r}: {manifest_path} is not valid JSON: {e}") \
            from None
    required = ("num_tokens", "dtype", "vocab_size", "eos_id", "token_file")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise UserError(f"data.source={src!r}: {manifest_path} lacks fields {missing}")
    if manifest.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise UserError(
            f"data.source={src!r}: {manifest_path} has format_version "
            f"{manifest['format_version']}, this version reads {FORMAT_VERSION}"
        )
    folder = manifest_path.parent
    if p.suffix == ".bin" and p.name != manifest["token_file"]:
        raise UserError(
            f"data.source={src!r}: {manifest_path} describes {manifest['token_file']!r}, "
            f"not {p.name!r}"
        )
    _check_token_file(manifest_path, manifest,
                      f"fix or rebuild the token file (data.source={src!r})")
    spec = manifest.get("tokenizer")
    tokenizer: Tokenizer
    if spec == "byte":
        tokenizer = ByteTokenizer()
    elif (folder / TOKENIZER_FILE).is_file():
        tokenizer = HFTokenizer(folder / TOKENIZER_FILE, str(spec))
    else:
        tokenizer = _VocabOnlyTokenizer(manifest)
    if tokenizer.vocab_size != int(manifest["vocab_size"]):
        raise UserError(
            f"data.source={src!r}: manifest vocab_size={manifest['vocab_size']} but its "
            f"tokenizer has {tokenizer.vocab_size}"
        )
    return folder, manifest, tokenizer


# ----------------------------------------------------------------------------- dataset


class Dataset:
    """Token windows of one experiment and the order they are served in.

    Build with :meth:`from_config`. All batch methods are pure functions of
    (``data.seed``, arguments) and return int32 arrays of windows of
    ``seq_len + 1`` tokens (inputs ``w[:, :-1]``, targets ``w[:, 1:]``).
    """

    def __init__(self, tokens: np.ndarray, manifest: dict[str, Any], tokenizer: Tokenizer,
                 *, seq_len: int, global_batch_size: int, seed: int, val_fraction: float,
                 path: Path | None = None) -> None:
        self.tokens = tokens
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.path = path
        n = int(tokens.size)
        w = seq_len + 1
        num_val_tokens = int(n * val_fraction)
        num_train_tokens = n - num_val_tokens
        self.num_train_windows = num_train_tokens // w
        self.num_val_windows = num_val_tokens // w
        if self.num_train_windows < 1:
            raise UserError(
                f"corpus too short: {n} tokens leave {num_train_tokens} for training, fewer "
                f"than one window of data.seq_len+1={w} tokens (data.source="
                f"{manifest.get('source')!r}, data.val_fraction={val_fraction})"
            )
        if val_fraction > 0 and self.num_val_windows < 1:
            raise UserError(
                f"corpus too short for validation: data.val_fraction={val_fraction} of {n} "
                f"tokens is {num_val_tokens} tokens, fewer than one window of "
                f"data.seq_len+1={w}; raise data.val_fraction or set it to 0"
            )
        self._train = tokens[: self.num_train_windows * w].reshape(self.num_train_windows, w)
        self._val = tokens[num_train_tokens: num_train_tokens + self.num_val_windows * w]
        self._val = self._val.reshape(self.num_val_windows, w)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- construction

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, progress: bool | None = None) -> Dataset:
        """Build (or reuse) the token cache of ``cfg.data`` and check it fits the model."""
        data = cfg.data
        kind, _ = source_kind(data.source)
        if kind == "tokens":
            folder, manifest, tokenizer = open_token_file(data)
        else:
            folder, manifest, tokenizer = build_token_cache(
                data, progress=progress, model_vocab_size=cfg.model.vocab_size)
        _check_vocab(tokenizer.spec, tokenizer.vocab_size, cfg.model.vocab_size)
        if int(manifest["num_tokens"]) == 0:
            raise UserError(f"data.source={data.source!r}: the corpus is empty (0 tokens)")
        tokens = np.memmap(folder / manifest["token_file"], dtype=np.dtype(manifest["dtype"]),
                           mode="r", shape=(int(manifest["num_tokens"]),))
        if kind == "tokens" and tokens.size:
            top = int(tokens.max())
            limit = min(int(manifest["vocab_size"]), cfg.model.vocab_size)
            if top >= limit:
                raise UserError(
                    f"data.source={data.source!r}: token id {top} is outside the vocabulary "
                    f"(manifest vocab_size={manifest['vocab_size']}, "
                    f"model.vocab_size={cfg.model.vocab_size})"
                )
        return cls(tokens, manifest, tokenizer, seq_len=data.seq_len,
                   global_batch_size=cfg.train.global_batch_size, seed=data.seed,
                   val_fraction=data.val_fraction, path=folder)

    # -- sizes

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- training order

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``: a numpy PCG64 permutation seeded by (seed, epoch)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_train_windows)
            self._perms[epoch] = perm
            while len(self._perms) > 4:  # a batch spans at most a few epochs
                self._perms.popitem(last=False)
        return perm

    def window_indices(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Training-window indices of rows [start, stop) of step ``step``'s batch."""
        b = self.global_batch_size
        stop = b if stop is None else stop
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= start <= stop <= b:
            raise ValueError(f"rows [{start}, {stop}) are outside the global batch [0, {b})")
        i = step * b + np.arange(start, stop, dtype=np.int64)
        epoch = i // self.num_train_windows
        pos = i % self.num_train_windows
        out = np.empty_like(i)
        for e in np.unique(epoch):
            mask = epoch == e
            out[mask] = self.permutation(int(e))[pos[mask]]
        return out

    def global_batch_rows(self, step: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of :meth:`global_batch` (``step``), reading only those."""
        idx = self.window_indices(step, start, stop)
        return np.asarray(self._train[idx], dtype=np.int32)

    def global_batch(self, step: int) -> np.ndarray:
        """int32 (global_batch_size, seq_len + 1) windows of optimizer step ``step``."""
        return self.global_batch_rows(step, 0, self.global_batch_size)

    def micro_batches(self, step: int, num_micro: int) -> np.ndarray:
        """(num_micro, global_batch_size // num_micro, seq_len + 1); micro-batch m holds
        rows [m*b, (m+1)*b) of the global batch."""
        b = self.global_batch_size
        if num_micro <= 0 or b % num_micro:
            raise ValueError(
                f"num_micro={num_micro} must be > 0 and divide train.global_batch_size={b}"
            )
        return self.global_batch(step).reshape(num_micro, b // num_micro, self.seq_len + 1)

    # -- validation

    def val_batch(self, index: int, batch_size: int) -> np.ndarray:
        """int32 (batch_size, seq_len + 1): validation windows ``index*batch_size + k``
        (wrapping around the split), the same on every call."""
        if self.num_val_windows == 0:
            raise ValueError("no validation split: data.val_fraction is 0")
        if index < 0 or batch_size <= 0:
            raise ValueError(f"val_batch(index={index}, batch_size={batch_size}): index must "
                             "be >= 0 and batch_size > 0")
        idx = (index * batch_size + np.arange(batch_size)) % self.num_val_windows
        return np.asarray(self._val[idx], dtype=np.int32)

    def describe(self) -> dict[str, Any]:
        """A summary for command lines and logs."""
        return {
            "source": self.manifest.get("source"),
            "source_kind": self.manifest.get("source_kind", "tokens"),
            "tokenizer": self.tokenizer.spec,
            "vocab_size": self.vocab_size,
            "num_tokens": self.num_tokens,
            "num_train_windows": self.num_train_windows,
            "num_val_windows": self.num_val_windows,
            "cache": str(self.path) if self.path is not None else None,
        }


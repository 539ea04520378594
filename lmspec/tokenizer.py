"""Tokenizers: raw bytes, a byte-level BPE trained locally, or a saved ``tokenizer.json``.

Every tokenizer has ``encode``/``decode``, ``vocab_size``, ``bos_id``, ``eos_id`` and a
``hash`` that changes whenever the mapping from text to ids could change, so a token
cache keyed by it is never reused with a different tokenizer. Imports neither jax nor
torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmspec.errors import UserError, UserFileNotFoundError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)

# eos names used by common tokenizer.json files, tried in order for a user's tokenizer
_EOS_NAMES = (EOS, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BOS_NAMES = (BOS, "<s>", "<bos>", "<|begin_of_text|>")


class Tokenizer:
    """Interface shared by all tokenizers (see the module docstring)."""

    spec: str  # what the config said: "byte", "bpe:4096" or a path
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    hash: str  # 16 hex chars

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are rendered as their names."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several documents, one array each."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then ``<|bos|>``=256, ``<|eos|>``=257, ``<|pad|>``=258."""

    def __init__(self) -> None:
        self.spec = "byte"
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259
        self.hash = _short_hash(b"lmspec-byte-tokenizer-v1")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of UTF-8 ``data`` as a uint16 array, without a Python loop per byte."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_bytes(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        names = {self.bos_id: BOS, self.eos_id: EOS, self.pad_id: PAD}
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in names:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, 259)")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(names[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json``."""

    def __init__(self, path: str | os.PathLike, spec: str) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if not path.is_file():
            raise UserFileNotFoundError(f"data.tokenizer={spec!r}: no such file {path}")
        raw = path.read_bytes()
        try:
            self._tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as e:  # the library raises plain Exception subclasses
            raise UserError(f"data.tokenizer={spec!r}: {path} is not a tokenizer.json: {e}") \
                from None
        self.spec = spec
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.hash = _short_hash(raw)
        eos = _first_id(self._tok, _EOS_NAMES)
        if eos is None:
            raise UserError(
                f"data.tokenizer={spec!r}: {path} has no end-of-document token; expected one "
                f"of {list(_EOS_NAMES)}"
            )
        self.eos_id = eos
        bos = _first_id(self._tok, _BOS_NAMES)
        self.bos_id = eos if bos is None else bos
        self.pad_id = _first_id(self._tok, (PAD, "<pad>"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _first_id(tok: object, names: Sequence[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)  # type: ignore[attr-defined]
        if i is not None:
            return int(i)
    return None


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def parse_bpe_size(spec: str) -> int:
    """Vocabulary size of ``bpe:<N>``; ValueError naming ``data.tokenizer`` otherwise."""
    try:
        n = int(spec[4:])
    except ValueError:
        raise UserError(f"data.tokenizer={spec!r}: expected bpe:<vocab_size>, e.g. bpe:4096") \
            from None
    if n < 260:
        raise UserError(f"data.tokenizer={spec!r}: BPE vocab_size must be >= 260")
    return n


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike,
              progress: bool = False) -> Path:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) and save it atomically.

    Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` get ids 0, 1, 2; every byte is
    in the initial alphabet, so any text round-trips.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmspec.io import atomic_write_text

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return atomic_write_text(path, tok.to_str())


def load_tokenizer(spec: str, *, corpus: Iterable[str] | None = None,
                   corpus_hash: str | None = None,
                   cache_dir: str | os.PathLike = ".cache/lmspec",
                   progress: bool = False) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer``.

    ``bpe:<N>`` needs the corpus (an iterable of documents) and its hash: the trained
    tokenizer is cached as ``<cache_dir>/tokenizers/bpe<N>-<corpus_hash>/tokenizer.json``
    and reused on later calls.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        n = parse_bpe_size(spec)
        if corpus is None or corpus_hash is None:
            raise ValueError(f"data.tokenizer={spec!r}: training a BPE needs the corpus")
        path = Path(cache_dir) / "tokenizers" / f"bpe{n}-{corpus_hash[:16]}" / "tokenizer.json"
        if not path.is_file():
            from lmspec.io import file_lock

            with file_lock(path.parent / ".lock"):
                if not path.is_file():  # another process may have trained it meanwhile
                    train_bpe(corpus, n, path, progress=progress)
        return HFTokenizer(path, spec)
    if spec.endswith(".json"):
        return HFTokenizer(spec, spec)
    if Path(spec).is_dir():  # a Hugging Face model or tokenizer folder
        path = Path(spec) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"data.tokenizer={spec!r}: the folder has no tokenizer.json (a "
                            "fast tokenizer file, as save_pretrained writes)")
        return HFTokenizer(path, spec)
    raise UserError(
        f"data.tokenizer={spec!r}: allowed are 'byte', 'bpe:<vocab_size>', a path to a "
        "tokenizer.json or a Hugging Face folder holding one"
    )

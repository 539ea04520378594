"""lmspec.data and lmspec.tokenizer: sources, token cache, batch order, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lmspec.data as data_mod
from lmspec.config import ConfigError, load_config
from lmspec.data import Dataset, fingerprint
from lmspec.errors import UserError
from lmspec.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

NON_ASCII = "naïve café — Grüße, 日本語のテキスト, emoji 🐍🚀, Ελληνικά, עברית\n\ttabs\r\n"


def make_cfg(tmp_path: Path, source: str | Path, *overrides: str):
    """configs/tiny.yaml with a test source, a private cache and no validation split
    unless ``overrides`` set one."""
    return load_config(TINY, [
        f"data.source={source}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0",
        *overrides,
    ])


def stdlib_texts(n: int) -> list[str]:
    """The first ``n`` UTF-8 stdlib files at the top level of the stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.glob("*.py")):
        try:
            out.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        if len(out) == n:
            break
    return out


def distinct_text(num_bytes: int) -> str:
    """ASCII text whose every 8-byte block differs from the others (lets tests tell
    windows apart by content)."""
    blocks = [f"{i:07d}\n" for i in range(num_bytes // 8 + 1)]
    return "".join(blocks)[:num_bytes]


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    for text in [NON_ASCII, *stdlib_texts(3), ""]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, 257, 256, 258]) == "hi<|eos|><|bos|><|pad|>"
    with pytest.raises(ValueError, match="259"):
        tok.decode([300])


def test_bpe_round_trip_cached_and_loadable_by_path(tmp_path):
    corpus = stdlib_texts(15) + [NON_ASCII * 3]
    corpus_hash = "c" * 64
    tok = load_tokenizer("bpe:400", corpus=corpus, corpus_hash=corpus_hash,
                         cache_dir=tmp_path)
    assert tok.vocab_size == 400
    assert tok.eos_id != tok.bos_id
    assert tok.decode([tok.eos_id]) == "<|eos|>"
    unseen = "def résumé(x):\n    return x ** 2  # ∑ 漢字 🎉\n"
    for text in [*stdlib_texts(20)[15:], NON_ASCII, unseen]:
        ids = tok.encode(text)
        assert all(0 <= i < 400 for i in ids)
        assert tok.decode(ids) == text
    # BPE merges compress real code: fewer tokens than bytes
    sample = stdlib_texts(16)[15]
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode("utf-8"))

    path = tmp_path / "tokenizers" / f"bpe400-{corpus_hash[:16]}" / "tokenizer.json"
    stat = path.stat()
    again = load_tokenizer("bpe:400", corpus=corpus, corpus_hash=corpus_hash,
                           cache_dir=tmp_path)
    assert again.hash == tok.hash
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # reused, not retrained

    by_path = load_tokenizer(str(path))
    assert by_path.hash == tok.hash and by_path.encode(unseen) == tok.encode(unseen)


def test_tokenizer_json_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "noeos.json"
    path.write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(ValueError, match="end-of-document"):
        load_tokenizer(str(path))


def test_bad_tokenizer_spec_is_a_config_error(tmp_path):
    for spec, word in [("wordpiece", "allowed"), ("bpe:abc", "bpe:<vocab_size>"),
                       ("bpe:100", ">= 260")]:
        with pytest.raises(ConfigError, match=word) as e:
            make_cfg(tmp_path, "stdlib", f"data.tokenizer={spec}")
        assert "data.tokenizer" in str(e.value)


# ----------------------------------------------------------------------------- sources


def test_text_file_source_is_its_bytes(tmp_path):
    f = tmp_path / "a.txt"
    text = distinct_text(3000) + NON_ASCII
    f.write_text(text, encoding="utf-8")
    cfg = make_cfg(tmp_path, f, "data.seq_len=15", "data.val_fraction=0.1")
    ds = Dataset.from_config(cfg)
    raw = text.encode("utf-8")
    assert ds.manifest["source_kind"] == "text"
    assert ds.num_tokens == len(raw)
    assert bytes(np.asarray(ds.tokens, dtype=np.uint8)) == raw
    n_val = int(len(raw) * 0.1)
    assert ds.num_train_windows == (len(raw) - n_val) // 16
    assert ds.num_val_windows == n_val // 16
    # validation windows are the tail of the stream, not in the training windows
    val = ds.val_batch(0, ds.num_val_windows)
    start = len(raw) - n_val
    expect = np.frombuffer(raw[start:start + ds.num_val_windows * 16], np.uint8).reshape(-1, 16)
    np.testing.assert_array_equal(val, expect)
    assert val.dtype == np.int32
    np.testing.assert_array_equal(ds.val_batch(1, 2), val[2:4])
    # "text:" forces the kind even for another extension
    g = tmp_path / "b.jsonl"
    g.write_text(text, encoding="utf-8")
    forced = Dataset.from_config(make_cfg(tmp_path, f"text:{g}", "data.seq_len=15"))
    assert forced.manifest["source_kind"] == "text" and forced.num_tokens == len(raw)


def _write_tree(root: Path) -> dict[str, bytes]:
    files = {
        "b/two.txt": "second file ✓\n".encode() * 20,
        "a/one.txt": b"first file\n" * 30,
        "c.md": b"# third\n" * 25,
        "blob.bin": bytes(range(256)) * 4,  # NUL bytes: binary, skipped
        "latin1.txt": "caf\xe9\n".encode("latin-1") * 40,  # not UTF-8, skipped
    }
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return files


def _joined(docs: list[bytes], eos: int) -> np.ndarray:
    parts = []
    for i, d in enumerate(docs):
        if i:
            parts.append([eos])
        parts.append(list(d))
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def test_directory_source_sorted_and_skips_binary(tmp_path):
    corpus = tmp_path / "corpus"
    files = _write_tree(corpus)
    ds = Dataset.from_config(make_cfg(tmp_path, corpus, "data.seq_len=31"))
    assert ds.manifest["source_kind"] == "dir"
    assert ds.manifest["skipped_files"] == 2
    assert ds.manifest["num_documents"] == 3
    docs = [files["a/one.txt"], files["b/two.txt"], files["c.md"]]  # sorted by path
    np.testing.assert_array_equal(np.asarray(ds.tokens), _joined(docs, 257))


def test_directory_holding_the_cache_leaves_it_out(tmp_path):
    corpus = tmp_path / "corpus"
    files = _write_tree(corpus)
    cfg = load_config(TINY, [f"data.source={corpus}", f"data.cache_dir={corpus / '.cache'}",
                             "data.val_fraction=0", "data.seq_len=31"])
    first = Dataset.from_config(cfg)
    second = Dataset.from_config(cfg)  # the cache's manifest.json is not read as text
    assert second.path == first.path
    docs = [files["a/one.txt"], files["b/two.txt"], files["c.md"]]
    np.testing.assert_array_equal(np.asarray(second.tokens), _joined(docs, 257))


def test_glob_source(tmp_path):
    corpus = tmp_path / "corpus"
    files = _write_tree(corpus)
    ds = Dataset.from_config(make_cfg(tmp_path, f"{corpus}/**/*.txt", "data.seq_len=31"))
    assert ds.manifest["source_kind"] == "glob"
    assert ds.manifest["skipped_files"] == 1  # latin1.txt
    docs = [files["a/one.txt"], files["b/two.txt"]]
    np.testing.assert_array_equal(np.asarray(ds.tokens), _joined(docs, 257))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        Dataset.from_config(make_cfg(tmp_path, f"{corpus}/*.nothing", "data.seq_len=31"))


def test_jsonl_source_and_its_errors(tmp_path):
    texts = ["first record " * 20, "", "second — ünïcödé " * 15, "third\n" * 30]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts))
                 + "\n\n", encoding="utf-8")
    ds = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=31"))
    assert ds.manifest["source_kind"] == "jsonl"
    docs = [t.encode("utf-8") for t in texts if t]
    np.testing.assert_array_equal(np.asarray(ds.tokens), _joined(docs, 257))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        Dataset.from_config(make_cfg(tmp_path, bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield.jsonl:3: record has no 'text' field"):
        Dataset.from_config(make_cfg(tmp_path, nofield))
    wrongtype = tmp_path / "wrongtype.jsonl"
    wrongtype.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrongtype.jsonl:1: 'text' must be a string"):
        Dataset.from_config(make_cfg(tmp_path, wrongtype))


def _write_token_file(folder: Path, ids: np.ndarray, vocab_size: int,
                      dtype: str = "uint16") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids.astype(dtype).tofile(folder / "tokens.bin")
    manifest = {"format_version": 1, "num_tokens": int(ids.size), "dtype": dtype,
                "vocab_size": vocab_size, "eos_id": vocab_size - 1, "token_file": "tokens.bin",
                "tokenizer": "external"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


def test_token_file_source_by_prefix_manifest_and_bin(tmp_path):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 500, size=4000)
    manifest = _write_token_file(tmp_path / "tok", ids, vocab_size=500)
    for source in (f"tokens:{tmp_path / 'tok'}", manifest, tmp_path / "tok" / "tokens.bin"):
        cfg = make_cfg(tmp_path, source, "data.seq_len=19", "data.val_fraction=0")
        ds = Dataset.from_config(cfg)
        assert ds.num_tokens == 4000 and ds.vocab_size == 500
        assert ds.num_train_windows == 4000 // 20
        batch = ds.global_batch(3)
        windows = ids[: 200 * 20].reshape(200, 20)
        idx = ds.window_indices(3)
        np.testing.assert_array_equal(batch, windows[idx])
    with pytest.raises(ValueError, match="tokenizer 'external' of this token file"):
        ds.tokenizer.encode("no tokenizer for an external token file")
    with pytest.raises(ValueError, match="data.max_bytes=100: applies to text sources only"):
        Dataset.from_config(make_cfg(tmp_path, manifest, "data.max_bytes=100"))

    # a cache folder built from text works as a token source, tokenizer included
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(5000), encoding="utf-8")
    built = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=31"))
    reread = Dataset.from_config(make_cfg(tmp_path, f"tokens:{built.path}", "data.seq_len=31"))
    assert reread.tokenizer.hash == built.tokenizer.hash
    np.testing.assert_array_equal(reread.global_batch(5), built.global_batch(5))


def test_uint32_token_file(tmp_path):
    ids = np.arange(3000) * 20 + 70000  # ids above 65535 need uint32
    _write_token_file(tmp_path / "big", ids, vocab_size=200000, dtype="uint32")
    cfg = make_cfg(tmp_path, f"tokens:{tmp_path / 'big'}", "data.seq_len=9",
                   "data.val_fraction=0", "model.vocab_size=200000")
    ds = Dataset.from_config(cfg)
    assert ds.global_batch(0).max() >= 70000


def test_stdlib_source_with_max_bytes(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    cfg = make_cfg(tmp_path, "stdlib", "data.max_bytes=100000", "data.seq_len=63")
    ds = Dataset.from_config(cfg)
    m = ds.manifest
    assert m["source_kind"] == "stdlib"
    assert m["num_bytes"] == 100_000
    # documents joined by eos: bytes + one eos between consecutive documents
    assert ds.num_tokens == 100_000 + m["num_documents"] - 1
    stream = np.asarray(ds.tokens)
    assert int((stream == 257).sum()) == m["num_documents"] - 1
    # the first document is the first non-empty UTF-8 .py file by relative path
    first = next(
        b for b in (p.read_bytes() for p in sorted(
            (p for p in root.rglob("*.py") if "site-packages" not in p.parts),
            key=lambda p: p.relative_to(root).as_posix()))
        if b and b"\x00" not in b
    )
    first = first[:100_000]
    np.testing.assert_array_equal(stream[: len(first)], np.frombuffer(first, np.uint8))


# ----------------------------------------------------------------------------- batch order


def test_global_batch_rows_and_micro_batches_agree(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(40_000), encoding="utf-8")
    cfg = make_cfg(tmp_path, f, "data.seq_len=31", "train.global_batch_size=12",
                   "train.micro_batch_size=2")
    ds = Dataset.from_config(cfg)
    for step in (0, 1, 7, 250):  # 250 * 12 samples > one epoch of ~1200 windows
        full = ds.global_batch(step)
        assert full.shape == (12, 32) and full.dtype == np.int32
        for start, stop in [(0, 12), (0, 3), (3, 9), (11, 12), (5, 5)]:
            np.testing.assert_array_equal(ds.global_batch_rows(step, start, stop),
                                          full[start:stop])
        for num_micro in (1, 2, 3, 4, 6, 12):
            mb = ds.micro_batches(step, num_micro)
            assert mb.shape == (num_micro, 12 // num_micro, 32)
            for m in range(num_micro):
                b = 12 // num_micro
                np.testing.assert_array_equal(mb[m], full[m * b:(m + 1) * b])
    with pytest.raises(ValueError, match="num_micro=5"):
        ds.micro_batches(0, 5)
    with pytest.raises(ValueError, match="outside the global batch"):
        ds.global_batch_rows(0, 4, 13)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ds.global_batch(-1)
    # windows are real, non-overlapping slices of the training stream
    stream = np.asarray(ds.tokens, dtype=np.int32)
    for idx, row in zip(ds.window_indices(3), ds.global_batch(3), strict=True):
        np.testing.assert_array_equal(row, stream[idx * 32:(idx + 1) * 32])


def test_epoch_wrap_around_every_window_once_per_epoch(tmp_path):
    # 10 training windows of 8 tokens, global batch 4: step 2 holds samples 8..11 and
    # so straddles the boundary between epoch 0 and epoch 1
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(80), encoding="utf-8")
    cfg = make_cfg(tmp_path, f, "data.seq_len=7", "data.val_fraction=0",
                   "train.global_batch_size=4")
    ds = Dataset.from_config(cfg)
    assert ds.num_train_windows == 10
    windows = np.frombuffer(distinct_text(80).encode(), np.uint8).reshape(10, 8)
    rows = np.concatenate([ds.global_batch(s) for s in range(5)])  # samples 0..19
    ids = [int(np.flatnonzero((windows == r).all(axis=1))[0]) for r in rows]
    epoch0, epoch1 = ids[:10], ids[10:]
    assert sorted(epoch0) == list(range(10))
    assert sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled
    # order is the documented one: PCG64 permutation seeded by (data.seed, epoch)
    assert epoch0 == list(np.random.default_rng([0, 0]).permutation(10))
    assert epoch1 == list(np.random.default_rng([0, 1]).permutation(10))
    # a batch larger than an epoch still follows the same sample sequence
    big = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=7", "data.val_fraction=0",
                                       "train.global_batch_size=24"))
    np.testing.assert_array_equal(big.global_batch(0)[:20], rows)
    # another seed, another order
    other = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=7", "data.val_fraction=0",
                                         "train.global_batch_size=4", "data.seed=1"))
    assert not np.array_equal(np.concatenate([other.global_batch(s) for s in range(5)]), rows)


FINGERPRINT_SCRIPT = textwrap.dedent("""
    import json, sys
    from lmspec.config import load_config
    from lmspec.data import Dataset, fingerprint
    cfg = load_config(sys.argv[1], sys.argv[2:])
    ds = Dataset.from_config(cfg)
    print(json.dumps([fingerprint(ds.global_batch(s)) for s in range(4)]))
""")


def test_batches_identical_across_processes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(20_000) + NON_ASCII * 10, encoding="utf-8")
    overrides = [f"data.source={f}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.seq_len=15", "data.seed=3"]
    ds = Dataset.from_config(load_config(TINY, overrides))
    mine = [fingerprint(ds.global_batch(s)) for s in range(4)]
    assert len(set(mine)) == 4
    # a fresh cache in the child: it rebuilds and must still agree
    child_overrides = overrides[:1] + [f"data.cache_dir={tmp_path / 'cache2'}"] + overrides[2:]
    out = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_SCRIPT, str(TINY), *child_overrides],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert json.loads(out.stdout) == mine


def test_fingerprint_definition():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    # documented definition: sha256 of "int:<shape>:" and the values as little-endian int64
    expect = hashlib.sha256(b"int:(3, 4):" + a.astype("<i8").tobytes()).hexdigest()[:16]
    assert fingerprint(a) == expect
    assert fingerprint(a.astype(np.int64)) == expect
    assert fingerprint(a.astype(">i4")) == expect
    assert fingerprint(a.reshape(4, 3)) != expect
    b = a.copy()
    b[2, 3] += 1
    assert fingerprint(b) != expect
    assert len(fingerprint(np.zeros(3, np.float32))) == 16
    with pytest.raises(TypeError):
        fingerprint(np.array(["x"]))


# ----------------------------------------------------------------------------- the cache


def test_cache_reused_without_rewrite(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(10_000), encoding="utf-8")
    cfg = make_cfg(tmp_path, f, "data.seq_len=31")
    ds1 = Dataset.from_config(cfg)
    path1 = ds1.path
    tok, man = ds1.path / "tokens.bin", ds1.path / "manifest.json"
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (tok, man)]
    ds2 = Dataset.from_config(cfg)
    assert ds2.path == ds1.path
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (tok, man)] == before
    batch4 = ds1.global_batch(4)
    np.testing.assert_array_equal(ds2.global_batch(4), batch4)
    del ds1, ds2  # their memmaps must not see the truncation below (SIGBUS)
    # different content, max_bytes or tokenizer: another folder
    ds3 = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=31", "data.max_bytes=9000"))
    assert ds3.path != path1 and ds3.num_tokens == 9000
    f.write_text(distinct_text(10_000)[::-1], encoding="utf-8")
    ds4 = Dataset.from_config(cfg)
    assert ds4.path != path1
    del ds3, ds4
    # a token file that does not match its manifest is refused (left as it is), not used
    # and not rebuilt over; once the folder is deleted it is rebuilt
    with open(tok, "r+b") as fh:
        fh.truncate(100)
    f.write_text(distinct_text(10_000), encoding="utf-8")
    with pytest.raises(UserError, match=r"tokens\.bin: 100 bytes.*delete that folder"):
        Dataset.from_config(cfg)
    assert tok.stat().st_size == 100
    shutil.rmtree(tok.parent)
    ds6 = Dataset.from_config(cfg)
    assert ds6.path == tok.parent and tok.stat().st_size == 2 * 10_000
    np.testing.assert_array_equal(ds6.global_batch(4), batch4)


def test_build_interrupted_before_manifest_is_not_taken_as_valid(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(10_000), encoding="utf-8")
    cfg = make_cfg(tmp_path, f, "data.seq_len=31")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between token file and manifest")

    monkeypatch.setattr(data_mod, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        Dataset.from_config(cfg)
    folders = list((tmp_path / "cache" / "tokens").iterdir())
    folders = [p for p in folders if p.is_dir()]
    assert len(folders) == 1
    tok = folders[0] / "tokens.bin"
    assert tok.is_file() and not (folders[0] / "manifest.json").exists()
    tok.write_bytes(b"\x01\x00" * 10_000)  # same size, wrong content: must not be used
    monkeypatch.undo()
    ds = Dataset.from_config(cfg)
    assert (ds.path / "manifest.json").is_file()
    assert bytes(np.asarray(ds.tokens, np.uint8)) == distinct_text(10_000).encode()


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import lmspec.data as d
    from lmspec.config import load_config
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    d.atomic_write_json = die
    d.Dataset.from_config(load_config(sys.argv[1], sys.argv[2:]))
""")


@pytest.mark.multiprocess
def test_sigkilled_build_leaves_nothing_valid(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(10_000), encoding="utf-8")
    overrides = [f"data.source={f}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=31"]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(TINY), *overrides],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    (folder,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    assert not (folder / "manifest.json").exists()
    stale = (folder / "tokens.bin").stat()
    ds = Dataset.from_config(load_config(TINY, overrides))
    assert ds.path == folder and (folder / "manifest.json").is_file()
    assert (folder / "tokens.bin").stat().st_ino != stale.st_ino  # rebuilt, not adopted


# ----------------------------------------------------------------------------- errors


def _no_manifest_written(tmp_path: Path) -> bool:
    return not list((tmp_path / "cache").rglob("manifest.json"))


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.*no such file"):
        Dataset.from_config(make_cfg(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="data.source"):
        Dataset.from_config(make_cfg(tmp_path, f"tokens:{tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="data.source"):
        Dataset.from_config(make_cfg(tmp_path, f"jsonl:{tmp_path / 'nope.jsonl'}"))
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        Dataset.from_config(make_cfg(tmp_path, "stdlib", "data.max_bytes=1000",
                                     f"data.tokenizer={tmp_path / 'tok.json'}"))
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "x.bin").write_bytes(b"\0\0")
    with pytest.raises(FileNotFoundError, match="no manifest.json beside it"):
        Dataset.from_config(make_cfg(tmp_path, tmp_path / "lonely" / "x.bin"))
    assert _no_manifest_written(tmp_path)


def test_empty_corpus_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        Dataset.from_config(make_cfg(tmp_path, tmp_path / "empty.txt"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"corpus is empty \(1 binary"):
        Dataset.from_config(make_cfg(tmp_path, tmp_path / "bin"))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="corpus is empty"):
        Dataset.from_config(make_cfg(tmp_path, tmp_path / "empty.jsonl"))
    _write_token_file(tmp_path / "tok0", np.zeros(0, np.int64), vocab_size=300)
    with pytest.raises(ValueError, match="empty"):
        Dataset.from_config(make_cfg(tmp_path, f"tokens:{tmp_path / 'tok0'}"))
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_corpus_shorter_than_a_window(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("x" * 100)
    with pytest.raises(ValueError, match=r"too short.*data.seq_len\+1=129"):
        Dataset.from_config(make_cfg(tmp_path, f, "data.val_fraction=0"))
    # train has a window but the validation tail (10 tokens) does not
    with pytest.raises(ValueError, match="too short for validation.*data.val_fraction"):
        Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=15", "data.val_fraction=0.1"))
    ds = Dataset.from_config(make_cfg(tmp_path, f, "data.seq_len=15", "data.val_fraction=0"))
    assert ds.num_train_windows == 6 and ds.num_val_windows == 0
    with pytest.raises(ValueError, match="no validation split"):
        ds.val_batch(0, 1)


def test_vocabulary_larger_than_model(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(5000))
    with pytest.raises(ValueError, match=r"259 tokens.*model.vocab_size=258"):
        Dataset.from_config(make_cfg(tmp_path, f, "model.vocab_size=258"))
    # a BPE too large for the model is refused before it is trained
    with pytest.raises(ValueError, match=r"'bpe:600' has 600 tokens.*model.vocab_size=512"):
        Dataset.from_config(make_cfg(tmp_path, f, "data.tokenizer=bpe:600"))
    assert not (tmp_path / "cache" / "tokenizers").exists()
    assert _no_manifest_written(tmp_path)


def test_token_file_ids_outside_vocabulary(tmp_path):
    ids = np.arange(2000) % 300
    ids[1234] = 300  # one id equal to the manifest's vocab_size
    _write_token_file(tmp_path / "bad", ids, vocab_size=300)
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary"):
        Dataset.from_config(make_cfg(tmp_path, f"tokens:{tmp_path / 'bad'}", "data.seq_len=9"))
    ok = np.arange(2000) % 300  # within the manifest, beyond a 256-token model
    _write_token_file(tmp_path / "big", ok, vocab_size=300)
    with pytest.raises(ValueError, match=r"model.vocab_size=256"):
        Dataset.from_config(make_cfg(tmp_path, f"tokens:{tmp_path / 'big'}", "data.seq_len=9",
                                     "model.vocab_size=256"))
    # a token file shorter than its manifest says
    _write_token_file(tmp_path / "cut", ok, vocab_size=300)
    with open(tmp_path / "cut" / "tokens.bin", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ValueError, match="manifest.json says 2000"):
        Dataset.from_config(make_cfg(tmp_path, f"tokens:{tmp_path / 'cut'}", "data.seq_len=9"))


@pytest.mark.multiprocess
def test_concurrent_builds_agree(tmp_path):
    """Both sides of a parity run may build the same cache at the same moment."""
    f = tmp_path / "t.txt"
    f.write_text(distinct_text(300_000), encoding="utf-8")
    overrides = [f"data.source={f}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=31"]
    procs = [subprocess.Popen([sys.executable, "-c", FINGERPRINT_SCRIPT, str(TINY), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    results = {o for o, _ in outs}
    assert len(results) == 1
    (folder,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "tokens.bin"]
    ds = Dataset.from_config(load_config(TINY, overrides))
    assert json.loads(results.pop()) == [fingerprint(ds.global_batch(s)) for s in range(4)]

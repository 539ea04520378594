"""``hf-*`` data sources (lmspec.data_hf): local Hugging Face ``datasets`` folders and
parquet/json/text files give the same documents, token stream, cache key and batch
fingerprints as a ``.jsonl`` of the same texts; no hub, no ~/.cache; clean errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import ConfigError, load_config
from lmspec.data import Dataset, batch_fingerprint, read_corpus
from lmspec.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
HAVE_DATASETS = importlib.util.find_spec("datasets") is not None
needs_datasets = pytest.mark.skipif(
    not HAVE_DATASETS,
    reason="needs the optional 'datasets' package: pip install -e '.[hf]' (scripts/test.sh "
    "installs it; CI fails instead of skipping)")

TEXTS = [
    "def first():\n    return 1\n" * 20,
    "",  # empty documents are left out, as in a .jsonl source
    "naïve café — Grüße, 日本語のテキスト, emoji 🐍🚀\n" * 15,
    "".join(f"{i:07d}\n" for i in range(300)),
    "last one\n" * 40,
]


def make_cfg(tmp_path: Path, source: str | Path, *overrides: str, cache: str = "cache"):
    """configs/tiny.yaml with a test source, a private cache, short windows and no
    validation split unless ``overrides`` set one."""
    return load_config(TINY, [f"data.source={source}", f"data.cache_dir={tmp_path / cache}",
                              "data.val_fraction=0", "data.seq_len=31", *overrides])


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def save_dataset(path: Path, columns: dict[str, list]) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def parity(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", prelude + "from parity.cli import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_ci_installs_datasets():
    """scripts/test.sh installs the extra 'hf': in CI these tests must run, not skip."""
    if os.environ.get("CI") and not HAVE_DATASETS:
        pytest.fail("CI=true but 'datasets' is not installed: scripts/test.sh should have "
                    "installed the extra 'hf'")


def test_text_field_and_split_keys_validated(tmp_path):
    for key in ("data.text_field= ", "data.split="):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            make_cfg(tmp_path, "stdlib", key)
    # only for the kinds that use them
    f = tmp_path / "a.txt"
    f.write_text("hello\n" * 100)
    with pytest.raises(UserError, match=r"data.text_field='body' applies only to .*'jsonl'"):
        read_corpus(make_cfg(tmp_path, f, "data.text_field=body").data)
    with pytest.raises(UserError, match=r"data.split='test' applies only to .*'hf-disk'"):
        read_corpus(make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", TEXTS),
                             "data.split=test").data)


def test_jsonl_text_field(tmp_path):
    """data.text_field names the field of a .jsonl source too (default 'text')."""
    plain = Dataset.from_config(make_cfg(tmp_path, write_jsonl(tmp_path / "a.jsonl", TEXTS)))
    other = write_jsonl(tmp_path / "b.jsonl", TEXTS, field="content")
    ds = Dataset.from_config(make_cfg(tmp_path, other, "data.text_field=content"))
    np.testing.assert_array_equal(np.asarray(ds.tokens), np.asarray(plain.tokens))
    with pytest.raises(UserError, match=r"b.jsonl:1: record has no 'text' field \(data.text_f"):
        read_corpus(make_cfg(tmp_path, other).data)


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    (tmp_path / "saved").mkdir()
    for src in (f"hf-disk:{tmp_path / 'saved'}",
                f"hf-json:{write_jsonl(tmp_path / 'a.jsonl', TEXTS)}"):
        with pytest.raises(UserError, match=r"needs the 'datasets' package.*\.\[hf\]"):
            read_corpus(make_cfg(tmp_path, src).data)
    assert {k: os.environ.get(k) for k in before} == before  # restored


@needs_datasets
def test_hf_sources_same_stream_cache_key_and_fingerprints_as_jsonl(tmp_path):
    """The same texts through .jsonl, hf-disk (Dataset and a DatasetDict's split),
    hf-json, hf-parquet, each built into its own cache: identical tokens, cache folder
    name (content hash) and global-batch fingerprints."""
    import datasets

    jsonl = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    columns = {"text": TEXTS, "id": list(range(len(TEXTS)))}
    save_dataset(tmp_path / "saved", columns)
    train = datasets.Dataset.from_dict(columns)
    datasets.DatasetDict({"validation": train.select([0]), "train": train}).save_to_disk(
        str(tmp_path / "saved_dict"))
    train.to_parquet(str(tmp_path / "docs.parquet"))
    sources = {
        "jsonl": jsonl,
        "hf-disk": f"hf-disk:{tmp_path / 'saved'}",
        "hf-disk-dict": f"hf-disk:{tmp_path / 'saved_dict'}",
        "hf-json": f"hf-json:{jsonl}",
        "hf-parquet": f"hf-parquet:{tmp_path / 'docs.parquet'}",
    }
    built = {name: Dataset.from_config(make_cfg(tmp_path, src, cache=f"cache-{name}"))
             for name, src in sources.items()}
    ref = built["jsonl"]
    expect = np.concatenate([list(t.encode()) + [257] for t in TEXTS if t])[:-1]
    np.testing.assert_array_equal(np.asarray(ref.tokens), expect)
    ref_fps = [batch_fingerprint(ref.global_batch(s)) for s in range(3)]
    assert len(set(ref_fps)) == 3
    for name, ds in built.items():
        assert ds.manifest["source_kind"] == (name if name != "hf-disk-dict" else "hf-disk")
        assert ds.manifest["num_documents"] == 4
        np.testing.assert_array_equal(np.asarray(ds.tokens), np.asarray(ref.tokens))
        assert ds.path.name == ref.path.name, name  # same cache key
        assert [batch_fingerprint(ds.global_batch(s)) for s in range(3)] == ref_fps, name
    # the other split of the DatasetDict is another corpus
    val = read_corpus(make_cfg(tmp_path, sources["hf-disk-dict"], "data.split=validation").data)
    assert val.documents == [TEXTS[0].encode()]
    # max_bytes cuts the same way
    cut = [read_corpus(make_cfg(tmp_path, sources[k], "data.max_bytes=1000").data)
           for k in ("jsonl", "hf-disk", "hf-parquet")]
    assert 990 < cut[0].num_bytes <= 1000  # cut at a character boundary
    assert cut[0].documents == cut[1].documents == cut[2].documents


@needs_datasets
def test_hf_text_is_one_document_per_file_like_a_glob(tmp_path):
    corpus = tmp_path / "corpus"
    for i, t in enumerate(TEXTS):
        (corpus / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (corpus / f"d{i % 2}" / f"{i}.txt").write_text(t, encoding="utf-8")
    glob_ds = Dataset.from_config(make_cfg(tmp_path, f"{corpus}/**/*.txt", cache="c1"))
    hf_ds = Dataset.from_config(make_cfg(tmp_path, f"hf-text:{corpus}/**/*.txt", cache="c2"))
    assert hf_ds.manifest["source_kind"] == "hf-text"
    assert hf_ds.manifest["num_documents"] == glob_ds.manifest["num_documents"] == 4
    np.testing.assert_array_equal(np.asarray(hf_ds.tokens), np.asarray(glob_ds.tokens))
    assert batch_fingerprint(hf_ds.global_batch(0)) == batch_fingerprint(glob_ds.global_batch(0))
    # a single file by path
    one = read_corpus(make_cfg(tmp_path, f"hf-text:{corpus / 'd0' / '0.txt'}").data)
    assert one.documents == [TEXTS[0].encode()]


@needs_datasets
def test_text_field_chooses_the_column(tmp_path):
    saved = save_dataset(tmp_path / "saved", {"content": TEXTS, "text": ["x"] * len(TEXTS)})
    ds = read_corpus(make_cfg(tmp_path, f"hf-disk:{saved}", "data.text_field=content").data)
    assert ds.documents == [t.encode() for t in TEXTS if t]
    jl = write_jsonl(tmp_path / "c.jsonl", TEXTS, field="content")
    via_json = read_corpus(make_cfg(tmp_path, f"hf-json:{jl}", "data.text_field=content").data)
    assert via_json.documents == ds.documents


@needs_datasets
def test_cache_key_follows_the_data_and_is_stable(tmp_path):
    """Rebuilding from unchanged data reuses the cache (same key, nothing rewritten);
    changing one row, in place, gives another key: nothing stale is served by datasets'
    own cache (load_dataset runs on a throw-away cache folder) or by ours."""
    saved = save_dataset(tmp_path / "saved", {"text": TEXTS})
    pq = tmp_path / "docs.parquet"
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(pq))
    for src in (f"hf-disk:{saved}", f"hf-parquet:{pq}"):
        cfg = make_cfg(tmp_path, src)
        first = Dataset.from_config(cfg)
        stamp = (first.path / "manifest.json").stat().st_mtime_ns
        again = Dataset.from_config(cfg)
        assert again.path == first.path
        assert (again.path / "manifest.json").stat().st_mtime_ns == stamp
        assert not list(Path(cfg.data.cache_dir).glob(".hf-datasets-*"))  # cleaned up
    key = {"before": first.path.name}
    changed = [*TEXTS[:-1], TEXTS[-1].replace("last", "LAST")]
    save_dataset(tmp_path / "saved2", {"text": changed})
    datasets.Dataset.from_dict({"text": changed}).to_parquet(str(pq))  # same path
    for name, src in (("saved", f"hf-disk:{saved}"), ("saved2", f"hf-disk:{tmp_path / 'saved2'}"),
                      ("parquet", f"hf-parquet:{pq}")):
        key[name] = Dataset.from_config(make_cfg(tmp_path, src)).path.name
    assert key["saved"] == key["before"]
    assert key["saved2"] == key["parquet"] != key["before"]


@needs_datasets
def test_hub_switched_off_while_reading_only(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = save_dataset(tmp_path / "saved", {"text": TEXTS})
    seen = []
    real = datasets.load_from_disk

    def spy(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
                     datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_from_disk", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    read_corpus(make_cfg(tmp_path, f"hf-disk:{saved}").data)
    assert seen == [("1", "1", True, True)]
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert datasets.config.HF_HUB_OFFLINE is False and hub_constants.HF_HUB_OFFLINE is False


@needs_datasets
def test_errors_name_the_problem(tmp_path):
    import datasets

    saved = save_dataset(tmp_path / "saved", {"text": ["a", "b"], "n": [1, 2],
                                              "body": ["x", None]})
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}
                         ).save_to_disk(str(dd))
    jsonl = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.txt").write_text("not a dataset\n")
    cases = [
        (f"hf-disk:{tmp_path / 'nope'}", [], r"no such folder"),
        (f"hf-disk:{plain}", [], r"is not a dataset saved with save_to_disk"),
        (f"hf-disk:{saved}", ["data.text_field=content"],
         r"has no column data.text_field='content'; its columns are \['text', 'n', 'body'\]"),
        (f"hf-disk:{saved}", ["data.text_field=n"], r"column 'n' of .* holds .*int64.*not str"),
        (f"hf-disk:{saved}", ["data.text_field=body"], r"row 1 of column 'body' .* is null"),
        (f"hf-disk:{saved}", ["data.split=test"], r"holds one Dataset, not a DatasetDict"),
        (f"hf-disk:{dd}", ["data.split=validation"],
         r"no split data.split='validation'; the splits are \['test', 'train'\]"),
        (f"hf-json:{jsonl}", ["data.split=test"], r"have only the split 'train'"),
        (f"hf-json:{tmp_path}/*.nothing", [], r"the pattern matches no files"),
        (f"hf-parquet:{tmp_path / 'missing.parquet'}", [], r"no such file"),
        (f"hf-parquet:{plain}", [], r"is a folder; name its files with a glob"),
        (f"hf-parquet:{jsonl}", [], r"parquet builder cannot read 1 file"),
        (f"hf-json:{plain / 'x.txt'}", [], r"json builder cannot read 1 file"),
    ]
    for src, extra, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            read_corpus(make_cfg(tmp_path, src, *extra).data)
    # a split that exists is read
    assert read_corpus(make_cfg(tmp_path, f"hf-disk:{dd}", "data.split=test").data
                       ).documents == [b"b"]


@needs_datasets
def test_parity_data_cli_same_fingerprints_and_exit_2(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    saved = save_dataset(tmp_path / "saved", {"text": TEXTS})
    common = ("data.val_fraction=0", "data.seq_len=31", "--steps", "2")
    out = {}
    for name, src in (("jsonl", jsonl), ("hf", f"hf-disk:{saved}")):
        proc = parity("data", str(TINY), f"data.source={src}",
                      f"data.cache_dir={tmp_path / name}", *common, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        out[name] = [ln for ln in proc.stdout.splitlines() if "fingerprint" in ln]
    assert len(out["jsonl"]) == 2 and out["hf"] == out["jsonl"]
    # user errors: one line, exit status 2, no traceback
    bad = parity("data", str(TINY), f"data.source=hf-disk:{saved}", "data.text_field=body",
                 f"data.cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: ") and "its columns are ['text']" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = parity("data", str(TINY), f"data.source=hf-disk:{saved}",
                     f"data.cache_dir={tmp_path / 'c'}", cwd=tmp_path,
                     prelude="import sys; sys.modules['datasets'] = None; ")
    assert missing.returncode == 2, missing.stderr
    assert "needs the 'datasets' package" in missing.stderr and ".[hf]" in missing.stderr
    assert "Traceback" not in missing.stderr


OFFLINE_SCRIPT = """
import json, os, socket, sys
def refuse(*a, **k):
    raise AssertionError(f"network access attempted: {a}")
socket.socket.connect = refuse
socket.create_connection = refuse
from lmspec.config import load_config
from lmspec.data import read_corpus
out = {}
for src in sys.argv[3:]:
    cfg = load_config(sys.argv[1], [f"data.source={src}", f"data.cache_dir={sys.argv[2]}"])
    out[src] = len(read_corpus(cfg.data).documents)
out["offline_after"] = [os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE")]
print(json.dumps(out))
"""


@needs_datasets
def test_no_network_and_nothing_in_home_cache(tmp_path):
    """A fresh process with sockets refused and HOME pointing to an empty folder: the
    hf sources read, nothing is written under HOME, the offline switches are set only
    while reading, and the token cache folder holds no leftovers of datasets' cache."""
    jsonl = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    saved = save_dataset(tmp_path / "saved", {"text": TEXTS})
    (tmp_path / "t.txt").write_text(TEXTS[0])
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "XDG_")) and k != "TRANSFORMERS_OFFLINE"}
    env["HOME"] = str(home)
    cache = tmp_path / "cache"
    srcs = [f"hf-disk:{saved}", f"hf-json:{jsonl}", f"hf-text:{tmp_path / 't.txt'}"]
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(TINY), str(cache), *srcs],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [out[s] for s in srcs] == [4, 4, 1]
    assert out["offline_after"] == [None, None]
    assert list(home.rglob("*")) == []
    assert list(cache.iterdir()) == []  # the throw-away datasets cache is gone

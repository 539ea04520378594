"""``parity sweep``: the case plan, margins, the summary, the corpora it writes, and the
command's output and exit status (cases stubbed; the real sweep is documented in
docs/parity.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmspec.config import load_config
from lmspec.data import Dataset
from parity import sweep_cmd as S
from parity.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_plan_full_and_quick():
    full = S.plan(quick=False)
    names = [c.name for c in full.cases]
    assert names[:10] == [f"tiny-seed{n}" for n in range(10)]
    assert {"text-corpus", "jsonl-corpus", "odd-shape"} <= set(names) and len(names) == 13
    assert full.zero_stages == "1,2,3" and full.precisions == "fp32,bf16" and not full.steps
    quick = S.plan(quick=True)
    assert [c.name for c in quick.cases] == ["tiny-seed7", "text-corpus", "odd-shape"]
    assert quick.zero_stages == "1" and "--steps-fp32" in quick.steps
    cfg = load_config(ROOT / "configs/tiny.yaml", list(S.ODD_SHAPE))
    m = cfg.model
    assert (m.num_key_value_heads, m.hidden_size, m.head_dim, m.intermediate_size,
            m.vocab_size, cfg.data.seq_len, m.num_hidden_layers, m.tie_word_embeddings) == \
        (1, 96, 32, 200, 1001, 96, 3, False)


def test_margin_normalises_so_that_one_passes():
    assert S.margin({"value": 5e-5, "limit": 1e-4, "op": "<="}) == pytest.approx(0.5)
    assert S.margin({"value": 0.995, "limit": 0.99, "op": ">="}) == pytest.approx(0.5)
    assert S.margin({"value": 0.98, "limit": 0.99, "op": ">="}) == pytest.approx(2.0)
    assert S.margin({"value": 0, "limit": 0, "op": "<="}) == 0.0
    assert S.margin({"value": 2, "limit": 0, "op": "<="}) == math.inf
    assert S.margin({"value": "nan", "limit": 1.0, "op": "<="}) == math.inf
    assert S.margin({"value": 1.0, "limit": 1.0, "margin": 0.25}) == 0.25


def test_summarise_groups_stages_and_counts_failures():
    res = [{"case": "a", "checks": [
        {"name": "fp32 zero1: loss", "value": 1e-6, "limit": 1e-5, "op": "<=", "passed": True},
        {"name": "fp32 zero3: loss", "value": 3e-6, "limit": 1e-5, "op": "<=", "passed": True}]},
        {"case": "b", "checks": [
            {"name": "fp32 zero2: loss", "value": 2e-5, "limit": 1e-5, "op": "<=",
             "passed": False}]},
        {"case": "c", "checks": [
            {"name": "fp32 zero2: loss", "value": 5e-5, "limit": 1e-4, "op": "<=",
             "passed": True}]}]
    (e,) = S.summarise(res)
    assert e["check"] == "fp32 zero*: loss" and e["count"] == 4 and e["failures"] == 1
    assert e["worst_case"] == "b" and e["worst_margin"] == pytest.approx(2.0)
    # value and limit are the worst case's (limits differ per case: judged checks)
    assert (e["worst_value"], e["limit"]) == (2e-5, 1e-5)


def test_corpora_are_readable_by_the_data_pipeline(tmp_path):
    paths = S.write_corpora(tmp_path / "corpora")
    assert paths["text"].stat().st_size > 500_000
    first = json.loads(paths["jsonl"].read_text().splitlines()[0])
    assert isinstance(first["text"], str) and first["text"]
    for kind in ("text", "jsonl"):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.source={paths[kind]}", f"data.cache_dir={tmp_path / 'c'}"])
        ds = Dataset.from_config(cfg, progress=False)
        assert ds.num_train_windows > 1000


def test_sweep_command_output_and_exit_status(tmp_path, monkeypatch, capsys):
    def fake(case, p, out, corpora, cache, timeout):
        bad = case.name == "odd-shape"
        checks = [{"name": "fp32 zero1: update rel err", "value": 2e-4 if bad else 5e-5,
                   "limit": 1e-4, "op": "<=", "passed": not bad}]
        return {"case": case.name, "overrides": [], "exit": 1 if bad else 0, "seconds": 1.0,
                "checks": checks, "errors": [], "failed": [c["name"] for c in checks
                                                          if not c["passed"]]}

    monkeypatch.setattr(S, "run_case", fake)
    monkeypatch.setattr(S, "write_corpora", lambda out: {"text": out / "t.txt",
                                                         "jsonl": out / "t.jsonl"})
    args = build_parser().parse_args(["sweep", "--out", str(tmp_path), "--quick"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "[sweep] 3/3 odd-shape: FAIL (exit 1)" in out
    assert "2  fp32 zero*: update rel err" in out
    assert out.strip().splitlines()[-1].startswith("[sweep] 1 of 3 case(s) failed")
    rec = json.loads((tmp_path / "sweep.json").read_text())
    assert rec["failures"] == 1 and len(rec["cases"]) == 3
    args = build_parser().parse_args(["sweep", "--out", str(tmp_path), "--cases",
                                      "tiny-seed1,tiny-seed2"])
    assert args.func(args) == 0
    with pytest.raises(ValueError, match="--cases: unknown"):
        args = build_parser().parse_args(["sweep", "--out", str(tmp_path), "--cases", "x"])
        args.func(args)

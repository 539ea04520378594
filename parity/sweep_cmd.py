"""``parity sweep --out DIR [--quick]``: the specificity sweep.

Runs the unchanged project through ``parity run`` on clean cases that a faithful port
must all pass: seeds 0-9 of configs/tiny.yaml, a plain-text corpus and a jsonl corpus
(both written by the command from the Python standard library's module docstrings, so
every machine has them), and an odd-shape config (MQA with 1 kv head, hidden 96 = 3
heads x 32, MLP 200, vocabulary 1001 via ``bpe:1001``, seq_len 96, 3 layers, untied),
in fp32 and bf16 against ZeRO 1-3. Prints one progress line per case and, last, each
check's worst margin (value over limit, normalised so that <= 1 passes) over the sweep
and the number of failures; writes ``DIR/sweep.json``; exit status 1 on any failure.

``--quick`` (CI): 3 cases (seed 7, the text corpus, the odd shape), ZeRO-1 only, 5 fp32
and 10 bf16 steps, one shared token cache.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmspec.errors import UserError
from lmspec.io import ensure_writable_dir

ROOT_CONFIG = "configs/tiny.yaml"
ODD_SHAPE = ("model.num_attention_heads=3", "model.num_key_value_heads=1",
             "model.hidden_size=96", "model.intermediate_size=200", "model.vocab_size=1001",
             "data.tokenizer=bpe:1001", "data.seq_len=96", "model.num_hidden_layers=3",
             "model.tie_word_embeddings=false")
CORPUS_BYTES = 1_100_000  # about the size of the corpus that raised the false alarm


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...] = ()
    needs: str | None = None  # "text" / "jsonl": a corpus file the command writes


@dataclass
class Plan:
    cases: list[Case]
    zero_stages: str = "1,2,3"
    precisions: str = "fp32,bf16"
    steps: tuple[str, ...] = field(default_factory=tuple)


def all_cases() -> list[Case]:
    seeds = [Case(f"tiny-seed{n}", (f"train.seed={n}", f"data.seed={n}")) for n in range(10)]
    return seeds + [Case("text-corpus", needs="text"), Case("jsonl-corpus", needs="jsonl"),
                    Case("odd-shape", ODD_SHAPE)]


def plan(quick: bool) -> Plan:
    cases = all_cases()
    if not quick:
        return Plan(cases)
    by = {c.name: c for c in cases}
    return Plan([by["tiny-seed7"], by["text-corpus"], by["odd-shape"]], zero_stages="1",
                steps=("--steps-fp32", "5", "--steps-bf16", "10"))


# ----------------------------------------------------------------------------- corpora


def stdlib_docstrings(limit_bytes: int) -> list[str]:
    """Module and function docstrings of the standard library (sorted by path): plain
    English every Python installation carries."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc.strip() + "\n")
                    total += len(doc.encode()) + 1
                    if total >= limit_bytes:
                        return docs
    return docs


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_corpora(out: Path) -> dict[str, Path]:
    """``corpus.txt`` and ``corpus.jsonl`` ({"text": ...} per docstring) under ``out``."""
    docs = stdlib_docstrings(CORPUS_BYTES)
    if not docs:
        raise RuntimeError("no standard-library docstrings found to build the corpora")
    return {"text": _write_atomic(out / "corpus.txt", "\n".join(docs)),
            "jsonl": _write_atomic(out / "corpus.jsonl",
                                   "".join(json.dumps({"text": d}) + "\n" for d in docs))}


# ----------------------------------------------------------------------------- margins


def margin(check: Mapping[str, Any]) -> float:
    """``value / limit`` normalised so that <= 1 passes (the check's own ``margin`` when
    the report has one). ``>=`` checks of a similarity below 1 use
    ``(1 - value) / (1 - limit)``; NaN or a missing value is inf."""
    if check.get("margin") is not None:
        return float(check["margin"])
    try:
        v, lim = float(check["value"]), float(check["limit"])
    except (TypeError, ValueError):
        return math.inf
    if math.isnan(v):
        return math.inf
    if check.get("op", "<=") == ">=":
        if lim < 1.0 and v <= 1.0:
            return (1.0 - v) / (1.0 - lim)
        return lim / v if v > 0 else math.inf
    if lim == 0:
        return 0.0 if v == 0 else math.inf
    return v / lim


def check_family(name: str) -> str:
    """A check's name with the ZeRO stage taken out (``fp32 zero2: x`` -> ``fp32 zero*: x``)."""
    return re.sub(r"zero\d", "zero*", name)


def summarise(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per check family: worst margin over the sweep, where, and the failure count."""
    fam: dict[str, dict[str, Any]] = {}
    for res in results:
        for c in res.get("checks", []):
            f = check_family(c["name"])
            m = margin(c)
            e = fam.setdefault(f, {"check": f, "worst_margin": -math.inf, "worst_case": None,
                                   "worst_value": None, "limit": c.get("limit"),
                                   "failures": 0, "count": 0})
            e["count"] += 1
            e["failures"] += int(not c.get("passed", False))
            if m > e["worst_margin"] or e["worst_case"] is None:
                e.update(worst_margin=m, worst_case=res["case"], worst_value=c.get("value"),
                         limit=c.get("limit"))
    return sorted(fam.values(), key=lambda e: -e["worst_margin"])


# ----------------------------------------------------------------------------- running


def parity_cmd() -> list[str]:
    code = "import sys; from parity.cli import main; sys.argv[0] = 'parity'; sys.exit(main())"
    return [sys.executable, "-c", code]


def run_case(case: Case, p: Plan, out: Path, corpora: Mapping[str, Path],
             cache_dir: Path | None, timeout_s: float) -> dict[str, Any]:
    over = list(case.overrides)
    if case.needs:
        over.append(f"data.source={corpora[case.needs]}")
    if cache_dir is not None:
        over.append(f"data.cache_dir={cache_dir}")
    case_out = out / case.name
    cmd = (parity_cmd() + ["run", ROOT_CONFIG, *over, "--out", str(case_out),
                           "--zero-stages", p.zero_stages, "--precisions", p.precisions,
                           *p.steps])
    t0 = time.perf_counter()
    case_out.mkdir(parents=True, exist_ok=True)
    with open(case_out / "sweep.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    secs = time.perf_counter() - t0
    report = case_out / "report.json"
    checks: list[dict[str, Any]] = []
    errors: list[str] = []
    if report.is_file():
        data = json.loads(report.read_text())
        checks, errors = data.get("checks", []), data.get("errors", [])
    else:
        errors = [f"no report.json (exit {rc}); see {case_out / 'sweep.log'}"]
    return {"case": case.name, "overrides": over, "exit": rc, "seconds": secs,
            "checks": checks, "errors": errors,
            "failed": [c["name"] for c in checks if not c.get("passed")]}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run parity over clean cases and report each check's worst margin",
        description="Specificity sweep: `parity run` on seeds 0-9 of configs/tiny.yaml, a "
        "plain-text and a jsonl corpus and an odd-shape config (fp32 and bf16, ZeRO 1-3). "
        "A faithful port must pass every case; prints each check's worst margin "
        "(value / limit, <= 1 passes) and writes DIR/sweep.json.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder: one parity run per case under DIR/<case>, the "
                   "summary in DIR/sweep.json")
    p.add_argument("--quick", action="store_true",
                   help="3 cases, ZeRO-1, 5 fp32 / 10 bf16 steps (for CI)")
    p.add_argument("--cases", default=None, metavar="LIST",
                   help="only these case names (comma-separated; see sweep.json)")
    p.add_argument("--case-timeout", type=float, default=3600.0, metavar="S",
                   help="give up on one case after S seconds (default 3600)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    pl = plan(args.quick)
    if args.cases:
        want = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = {c.name: c for c in all_cases()}
        bad = [w for w in want if w not in known]
        if bad:
            raise UserError(f"--cases: unknown {bad}; known: {sorted(known)}")
        pl.cases = [known[w] for w in want]
    out = ensure_writable_dir(args.out.resolve(), "--out")
    corpora = write_corpora(out / "corpora") if any(c.needs for c in pl.cases) else {}
    cache = out / "token-cache" if args.quick else None
    results = []
    t0 = time.perf_counter()
    for i, case in enumerate(pl.cases, 1):
        res = run_case(case, pl, out, corpora, cache, args.case_timeout)
        results.append(res)
        worst = max((margin(c) for c in res["checks"]), default=math.inf)
        verdict = "pass" if res["exit"] == 0 else f"FAIL (exit {res['exit']})"
        print(f"[sweep] {i}/{len(pl.cases)} {case.name}: {verdict}, "
              f"{len(res['checks'])} checks, worst margin {worst:.3g}, "
              f"{res['seconds']:.0f} s" + (f"; failed: {', '.join(res['failed'])}"
                                          if res["failed"] else ""), flush=True)
        for e in res["errors"]:
            print(f"[sweep]   error: {e.splitlines()[0]}", flush=True)
    summary = summarise(results)
    failures = sum(r["exit"] != 0 for r in results)
    record = {"quick": args.quick, "zero_stages": pl.zero_stages, "precisions": pl.precisions,
              "steps": list(pl.steps), "seconds": time.perf_counter() - t0,
              "cases": results, "summary": summary, "failures": failures}
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, out / "sweep.json")
    print("[sweep] worst margin per check over the sweep (<= 1 passes):", flush=True)
    for e in summary:
        print(f"  {e['worst_margin']:9.3g}  {e['check']}  (value {e['worst_value']}, limit "
              f"{e['limit']}, {e['worst_case']}; failed {e['failures']}/{e['count']})",
              flush=True)
    print(f"[sweep] {failures} of {len(results)} case(s) failed; {out / 'sweep.json'}",
          flush=True)
    return 1 if failures else 0

"""The sensitivity catalogue: every planted porting bug of tests/plants/ makes the parity
run exit 1 and is localised to the right place; the same path on the unplanted project
exits 0 (so this test can fail both ways).

Affordable on 2 CPU cores: one ZeRO stage, the precision each plant needs, few steps,
and the DeepSpeed runs cached across plants (each plant patches only the JAX side, so
the reference is the same run; tests/plants/cached_trainer.py).

``python tests/test_parity_catalogue.py OUT [NAME ...]`` runs the catalogue outside
pytest and prints caught/localised per plant (docs/parity.md quotes its figures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANTS_DIR = ROOT / "tests" / "plants"
sys.path.insert(0, str(PLANTS_DIR))
import parity_plants  # noqa: E402

STEPS = {"fp32": 6, "bf16": 10}
CLEAN = ("clean_fp32", "clean_bf16")


def run_case(name: str, out: Path, cache: Path, timeout: float = 1800) -> dict:
    """One catalogue case in a fresh interpreter with the overlay on its path."""
    clean = name in CLEAN
    precision = name.split("_")[1] if clean else parity_plants.PLANTS[name].precision
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLANTS_DIR), str(ROOT)]))
    env.pop("PARITY_PLANT", None)
    env.pop("XLA_FLAGS", None)  # the harness gives the JAX trainer its own device count
    if not clean:
        env["PARITY_PLANT"] = name
    cmd = [sys.executable, str(PLANTS_DIR / "run_plant.py"), str(ROOT / "configs/tiny.yaml"),
           "--out", str(out), "--cache", str(cache), "--precisions", precision,
           "--zero-stages", "1", "--steps", str(STEPS[precision])]
    if not clean:
        cmd += list(parity_plants.PLANTS[name].overrides)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    diag_path = out / "diagnosis.json"
    diag = json.loads(diag_path.read_text()) if diag_path.is_file() else {}
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    return {"name": name, "rc": r.returncode, "seconds": time.perf_counter() - t0,
            "headline": diag.get("headline"), "category": diag.get("category"),
            "failed": failed, "tail": (r.stdout + r.stderr)[-3000:]}


def localised(case: dict, expected: str) -> bool:
    got = case.get("category") or ""
    return got == expected or got.startswith(expected + ":")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")


@pytest.mark.slow
@pytest.mark.catalogue
@pytest.mark.parametrize("name", CLEAN)
def test_unplanted_project_passes_the_same_path(name, cache, tmp_path):
    case = run_case(name, tmp_path / name, cache)
    assert case["rc"] == 0, case["tail"]
    assert case["category"] is None, case["headline"]


@pytest.mark.slow
@pytest.mark.catalogue
@pytest.mark.parametrize("name", sorted(parity_plants.PLANTS))
def test_planted_bug_is_caught_and_localised(name, cache, tmp_path):
    plant = parity_plants.PLANTS[name]
    case = run_case(name, tmp_path / name, cache)
    # the overlay reached the JAX trainer's own process
    (log,) = (tmp_path / name / "runs").glob("jax_*/train.log")
    assert f"{name} planted in {plant.module}" in log.read_text()
    assert case["rc"] == 1, f"{name} not caught: {case['tail']}"
    assert localised(case, plant.category), (name, plant.category, case["headline"])


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    names = argv[1:] or list(CLEAN) + sorted(parity_plants.PLANTS)
    cache = out / "cache"
    rows = []
    t0 = time.perf_counter()
    for name in names:
        case = run_case(name, out / name, cache)
        exp = None if name in CLEAN else parity_plants.PLANTS[name].category
        case["expected"] = exp
        case["caught"] = case["rc"] == 1 if exp else case["rc"] == 0
        case["localised"] = localised(case, exp) if exp else case["category"] is None
        rows.append(case)
        print(f"{name:18s} rc={case['rc']} caught={case['caught']} "
              f"localised={case['localised']} {case['seconds']:.0f}s  "
              f"[{case['category']}] {case['headline']}", flush=True)
        for f in case["failed"]:
            print(f"    {f}", flush=True)
    plants = [r for r in rows if r["expected"]]
    print(f"caught {sum(r['caught'] for r in plants)}/{len(plants)}, localised "
          f"{sum(r['localised'] for r in plants)}/{len(plants)}, clean ok "
          f"{sum(r['caught'] and r['localised'] for r in rows if not r['expected'])}/"
          f"{sum(not r['expected'] for r in rows)}; {time.perf_counter() - t0:.0f} s")
    (out / "catalogue.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

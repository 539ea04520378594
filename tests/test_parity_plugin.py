"""The pytest plugin: marker and option registered, the run_parity fixture passes and fails
cases with their numbers, reports kept with --parity-report-dir, summary table printed.
Cases run the harness with the contract-keeping stand-in trainer (tests/fake_trainer.py)."""

from __future__ import annotations

import sys
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

CASES = '''
import sys
import pytest

FAKE = lambda side: [sys.executable, "{fake}", side]
sys.path.insert(0, "{fake_dir}")
from fake_trainer import fake_truth as TRUTH
OVR = ["data.source=text:{corpus}", "data.cache_dir={cache}", "data.seq_len=32",
       "data.val_fraction=0.05"]

@pytest.mark.parity
def test_good(run_parity):
    res = run_parity("{config}", OVR, zero_stages=(1,), precisions=("fp32",),
                     trainer_cmd=FAKE, truth_fn=TRUTH, forward=False)
    assert res["checks"]

@pytest.mark.parity
def test_bad(parity_case, monkeypatch):
    monkeypatch.setenv("PARITY_FAKE_FAULT", "jax:fp32:loss")
    parity_case("{config}", OVR, zero_stages=(1,), precisions=("fp32",), steps=20,
                trainer_cmd=FAKE, truth_fn=TRUTH, forward=False)
'''


def test_marker_and_option_registered(pytestconfig):
    assert any(m.startswith("parity:") for m in pytestconfig.getini("markers"))
    assert pytestconfig.getoption("--parity-report-dir", default="absent") != "absent"


def test_plugin_does_not_import_jax_or_torch():
    import subprocess

    code = ("import sys, parity.pytest_plugin; "
            "print(any(m in sys.modules for m in ('jax', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_cases_pass_fail_and_summarise(pytester, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} lorem ipsum dolor sit amet\n" for i in range(600)))
    pytester.makepyfile(test_cases=CASES.format(corpus=corpus, cache=tmp_path / "cache",
                                                config=ROOT / "configs/tiny.yaml",
                                                fake=ROOT / "tests" / "fake_trainer.py",
                                                fake_dir=ROOT / "tests"))
    keep = tmp_path / "reports"
    res = pytester.runpytest("-p", "no:cacheprovider", f"--parity-report-dir={keep}")
    res.assert_outcomes(passed=1, failed=1)
    text = res.stdout.str()
    # the failure names the failing check with its number and limit
    res.stdout.fnmatch_lines(["*fp32 zero1: loss curve vs noise (20 steps): 0.001* "
                              "(limit <= *e-0*, noise *, margin *)*"])
    assert "parity checks" in text  # terminal summary section
    res.stdout.fnmatch_lines(["*test_cases.py::test_good: PASS*",
                              "*test_cases.py::test_bad: FAIL*"])
    kept = sorted(p.parent.name for p in keep.glob("*/report.html"))
    assert kept == ["test_cases.py_test_bad", "test_cases.py_test_good"]

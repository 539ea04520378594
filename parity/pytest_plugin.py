"""pytest plugin of the parity harness (registered as the ``pytest11`` entry point).

Users write parity cases as tests::

    @pytest.mark.parity
    def test_tiny_fp32(run_parity):
        run_parity("configs/tiny.yaml", zero_stages=(1, 3), precisions=("fp32",))

``run_parity(config, overrides=(), zero_stages=(1, 2, 3), precisions=("fp32", "bf16"),
steps=None, **options)`` runs the harness (:func:`parity.run.run_parity`) and returns its
result dict; when a check fails it fails the test with every failing check and its
number. ``steps`` is an int (both precisions) or ``{"fp32": n, "bf16": m}``; by default
the checks' windows, 20 and 50 (parity/limits.py). ``--parity-report-dir DIR`` keeps
each case's reports under ``DIR/<test name>/``; otherwise they go to the test's
``tmp_path``. At the end a table of every case's checks is printed.

Loaded in every pytest run of the project, so it imports neither jax nor torch at import
time; the harness is imported only when a case runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

_RESULTS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity")
    group.addoption("--parity-report-dir", default=None, metavar="DIR",
                    help="keep every parity case's report under DIR/<test name>/")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: runs the parity harness on both frameworks")
    config.stash[_RESULTS] = []


def _case_dir(request: pytest.FixtureRequest, tmp_path: Path, index: int) -> Path:
    root = request.config.getoption("--parity-report-dir")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")
    suffix = f"-{index}" if index else ""
    if root:
        return Path(root).resolve() / f"{name}{suffix}"
    return tmp_path / f"parity{suffix}"


def failure_message(result: Mapping[str, Any]) -> str:
    """Failing checks with value and limit, phase errors, and where the report is."""
    from parity.report import failing_checks, fmt

    lines = ["parity checks failed:"]
    for c in failing_checks(result):
        detail = ", ".join(f"{k}={v}" for k, v in (c.get("detail") or {}).items())
        lines.append(f"  {c['name']}: {fmt(c['value'])} (limit {c.get('op', '<=')} "
                     f"{fmt(c['limit'])}, noise {fmt(c.get('noise'))}, margin "
                     f"{fmt(c.get('margin'))})" + (f" [{detail}]" if detail else ""))
    for e in result.get("errors") or []:
        lines.append("  error: " + e.replace("\n", "\n    "))
    if not result.get("checks"):
        lines.append("  no checks were computed")
    paths = result.get("paths") or {}
    if "html" in paths:
        lines.append(f"report: {paths['html']}")
    return "\n".join(lines)


@pytest.fixture
def run_parity(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict]:
    """A function that runs one parity case and fails the test if a check fails."""
    calls = [0]

    def _run(config: str | Path, overrides: Sequence[str] = (),
             zero_stages: Sequence[int] = (1, 2, 3),
             precisions: Sequence[str] = ("fp32", "bf16"),
             steps: int | Mapping[str, int] | None = None, **options: Any) -> dict:
        from lmspec.config import load_config
        from parity.limits import BF16_STEPS, FP32_LOSS_STEPS
        from parity.run import ParityOptions
        from parity.run import run_parity as harness

        if isinstance(steps, int):
            steps = {"fp32": steps, "bf16": steps}
        steps = dict(steps or {})
        unknown = set(steps) - {"fp32", "bf16"}
        if unknown:
            raise ValueError(f"steps: unknown precisions {sorted(unknown)}; "
                             "allowed: fp32, bf16")
        cfg = load_config(config, list(overrides))
        out = _case_dir(request, tmp_path, calls[0])
        calls[0] += 1
        opts = ParityOptions(out=out, zero_stages=tuple(zero_stages),
                             precisions=tuple(precisions),
                             steps_fp32=steps.get("fp32", FP32_LOSS_STEPS),
                             steps_bf16=steps.get("bf16", BF16_STEPS), **options)
        result = harness(cfg, opts, config_source=str(config))
        from parity.report import all_passed

        request.config.stash[_RESULTS].append((request.node.nodeid, result))
        if not all_passed(result):
            pytest.fail(failure_message(result), pytrace=False)
        return result

    return _run


@pytest.fixture
def parity_case(run_parity: Callable[..., dict]) -> Callable[..., dict]:
    """Alias of :func:`run_parity`."""
    return run_parity


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    from parity.report import all_passed, fmt

    tr = terminalreporter
    tr.section("parity checks")
    for nodeid, result in results:
        verdict = "PASS" if all_passed(result) else "FAIL"
        tr.write_line(f"{nodeid}: {verdict}  ({(result.get('paths') or {}).get('html', '')})")
        checks = result.get("checks") or []
        width = max((len(c["name"]) for c in checks), default=10)
        for c in checks:
            tr.write_line(f"  {c['name']:<{width}}  {fmt(c['value']):>10}  "
                          f"{c.get('op', '<='):>2} {fmt(c['limit']):<10}  "
                          f"margin {fmt(c.get('margin')):<10}  "
                          f"{'pass' if c['passed'] else 'FAIL'}")
        for e in result.get("errors") or []:
            tr.write_line(f"  error: {e.splitlines()[0]}")

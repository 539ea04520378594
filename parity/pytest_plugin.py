"""pytest plugin of the parity harness (registered as the ``pytest11`` entry point).

Loaded in every pytest run of the project, so it imports neither jax nor torch at import
time; the harness is imported only when a parity case runs.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity")
    group.addoption("--parity-report-dir", default=None, metavar="DIR",
                    help="keep every parity case's report under DIR/<test name>/")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: runs the parity harness on both frameworks")

"""Plant one porting bug in ``jaxlm`` for a parity run (test code; see parity_plants.py).

Put this folder first on ``PYTHONPATH`` and set ``PARITY_PLANT=<name>``: every Python
process (the harness and each trainer it starts) then replaces one ``jaxlm`` function
right after its module is imported. Processes that never import ``jaxlm`` (the
DeepSpeed workers) are untouched. Without ``PARITY_PLANT`` this file does nothing.
"""

from __future__ import annotations

import os


def _install(name: str) -> None:
    import importlib.abc
    import importlib.machinery
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import parity_plants as catalogue

    if name not in catalogue.PLANTS:
        raise SystemExit(f"PARITY_PLANT={name!r}: unknown plant; known: "
                         f"{', '.join(sorted(catalogue.PLANTS))}")
    target = catalogue.PLANTS[name].module

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_=None):
            if fullname != target:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                catalogue.apply(name, module)
                catalogue.log(f"{name} planted in {fullname} (pid {os.getpid()})")

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())


if os.environ.get("PARITY_PLANT"):
    _install(os.environ["PARITY_PLANT"])

"""Test overlay (put on a trainer subprocess's PYTHONPATH): a row-offset bug in the rows
this process feeds. ``JAXLM_TEST_ROW_OFFSET=STEP`` makes the first row range the process
reads at that step come from one row further on; the overlay says which on stderr."""

import os
import sys

_step = os.environ.get("JAXLM_TEST_ROW_OFFSET")
if _step is not None:
    from jaxlm import batches

    _rows = batches.Batches.rows
    _done: list[int] = []

    def _shifted(self, step, start, stop):
        if step == int(_step) and not _done:
            _done.append(start)
            print(f"planted row offset: step {step} row {start}", file=sys.stderr, flush=True)
            return _rows(self, step, start + 1, stop + 1)
        return _rows(self, step, start, stop)

    batches.Batches.rows = _shifted

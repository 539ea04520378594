"""Non-finite loss or gradient norm: stop the run (or skip a few steps), never save it.

``train.nan_policy``: ``stop`` (default) ends the run at the first step whose loss or
pre-clip gradient norm is NaN or infinite; ``skip:N`` lets up to N such steps pass with
their update not applied (jaxlm drops it inside the compiled step; DeepSpeed skips it
itself, as its fp16 overflow logic does) and stops at the (N+1)-th. A stop raises
:class:`NonFiniteError`; the commands print it as one ``error: ...`` line and exit with
status :data:`EXIT_NON_FINITE` (3). Both trainers check every step before each
checkpoint save, so a checkpoint never holds a state that followed an unchecked step,
and the last good checkpoint is left as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

EXIT_NON_FINITE = 3
# torchlm: rank 0 leaves the stop message here for the launcher (its exit status 3)
STOP_FILE = "stopped.json"
POLICY_RE = re.compile(r"stop|skip:[0-9]+")


class NonFiniteError(RuntimeError):
    """A run stopped on a non-finite loss or gradient norm (exit status 3)."""


def max_skips(policy: str) -> int:
    """Non-finite steps ``policy`` lets pass: ``stop`` 0, ``skip:N`` N."""
    if not POLICY_RE.fullmatch(policy):
        raise ValueError(f"train.nan_policy={policy!r}: allowed are 'stop' and 'skip:N'")
    return 0 if policy == "stop" else int(policy.split(":", 1)[1])


@dataclass
class Guard:
    """Counts non-finite steps against ``train.nan_policy``; ``last_checkpoint`` is the
    newest checkpoint the run wrote or resumed from (named in the stop message)."""

    policy: str
    last_checkpoint: str | None = None
    skipped: list[int] = field(default_factory=list)

    def check(self, step: int, loss: float, grad_norm: float, *,
              update_skipped: bool = True) -> bool:
        """True when step ``step`` was finite; False when it is one of the non-finite
        steps the policy lets pass (its update was not applied); raises
        :class:`NonFiniteError` otherwise, or when ``update_skipped`` is False (the
        update went in, so the state in memory is no longer good)."""
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad_norm", grad_norm))
               if not math.isfinite(value)]
        if not bad:
            return True
        allowed = max_skips(self.policy)
        if update_skipped and len(self.skipped) < allowed:
            self.skipped.append(step)
            return False
        last = self.last_checkpoint or "none (no checkpoint was written)"
        if not update_skipped:
            why = "its update was applied, so it cannot be skipped"
        elif allowed:
            why = f"more than {allowed} non-finite steps: {self.skipped + [step]}"
        else:
            why = "non-finite"
        raise NonFiniteError(
            f"step {step}: {' and '.join(bad)}: stopped ({why}; train.nan_policy="
            f"{self.policy}); nothing was saved after the last good checkpoint: {last}"
        )

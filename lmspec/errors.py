"""The one error type for user mistakes.

Every command (``jaxlm``, ``torchlm``, ``parity``) raises :class:`UserError` (or a
subclass) for bad input: a config key or value, a missing or corrupt file, a bad
argument. :func:`lmspec.cli.run` prints those as one ``error: ...`` line with exit status
2 and no traceback; any other exception is a bug in this project and keeps its traceback.

``UserError`` derives from ``ValueError`` so callers that catch ``ValueError`` (and tests
written against it) keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the problem and, where there is one,
    what to do about it."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (in a config key, a flag) does not exist. Also a
    ``FileNotFoundError``, so code and tests that catch that keep working."""

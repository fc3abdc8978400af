"""How the command line tells a user's mistake from a bug.

`fineviti` prints a ValueError, KeyError or missing-file error as one line with exit status 2 (fineviti.cli), except
one raised inside `work()`: the phases where the arguments have been taken and the work runs (training steps, the
end of a run, an evaluation's forwards), where it may be a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib

KEEP_TRACEBACK = "fineviti_keep_traceback"


@contextlib.contextmanager
def work():
    """Marks an exception raised inside as one whose traceback the command line shows."""
    try:
        yield
    except Exception as exc:
        setattr(exc, KEEP_TRACEBACK, True)
        raise


def keeps_traceback(exc: BaseException) -> bool:
    return bool(getattr(exc, KEEP_TRACEBACK, False))

"""Ctrl-C before a command has its own handling in place (while Python imports JAX, while a run is
built): one line and exit status 130, not a traceback."""

from __future__ import annotations

EXIT_INTERRUPTED = 130
INTERRUPTED_AT_START = "interrupted before training started: nothing was saved; earlier checkpoints are intact"


def was_interrupted(err: BaseException) -> bool:
    """Whether ``err`` is a ``KeyboardInterrupt`` or was raised while handling one (an interrupted
    import of a compiled extension surfaces as an ``ImportError`` whose context is the interrupt)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False

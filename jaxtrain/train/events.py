"""Named events of the training loop, and the callbacks that subscribe to them.

The loop announces events; callbacks and algorithms react to them and never edit the loop.
"""

from __future__ import annotations

import enum
from typing import Any


class Event(enum.Enum):
    FIT_START = "fit_start"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"  # after a step's metrics are available on the host
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    CHECKPOINT = "checkpoint"
    FIT_END = "fit_end"


class Callback:
    """Subclass and override ``run_event``; ``loop`` is the running ``Trainer``."""

    def run_event(self, event: Event, loop: Any) -> None:  # pragma: no cover - interface
        del event, loop


class EventBus:
    """Calls every subscribed callback, in order, on each event."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks: list[Callback] = list(callbacks or [])

    def subscribe(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def fire(self, event: Event, loop: Any) -> None:
        for callback in self.callbacks:
            callback.run_event(event, loop)

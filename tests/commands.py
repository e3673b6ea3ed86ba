"""Counting the commands a test's client sends, through PyMongo's command monitoring (a
`monitoring.CommandListener` passed as the client's `event_listeners`; its `started` sees each
command document as sent: https://pymongo.readthedocs.io/en/stable/api/pymongo/monitoring.html)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pymongo import monitoring


class Commands(monitoring.CommandListener):
    """The commands started while `recording()` is open, those named `names` (all when none)."""

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)
        self.sent: list[monitoring.CommandStartedEvent] = []
        self._recording = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self._recording and (not self.names or event.command_name in self.names):
            self.sent.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    @contextmanager
    def recording(self) -> Iterator[list[monitoring.CommandStartedEvent]]:
        """A new `sent`, filled until the block ends."""
        self.sent, self._recording = [], True
        try:
            yield self.sent
        finally:
            self._recording = False

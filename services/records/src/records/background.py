"""The background workers of one records replica: export jobs, subscription delivery, CDex delivery.

Each kind claims its work from the shared datastore under a lease held in the name of `owner`
(host name plus a random suffix, so unique per process), wakes when this replica queues work
(`nudge`) or every poll interval (`idle`), and stops by cancelling its tasks and waiting for them.
A killed replica simply stops renewing its leases; another replica's workers take the work over.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Coroutine
from typing import Any


class Workers:
    def __init__(self) -> None:
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    def nudge(self) -> None:
        self.wake.set()

    async def idle(self, seconds: float) -> None:
        """Wait until this replica queues work or `seconds` pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.wake.clear()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

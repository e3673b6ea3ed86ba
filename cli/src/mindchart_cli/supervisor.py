"""Keeps a running stack running: whatever child dies is started again, after a pause that grows
with each recent death (bounded backoff), and every death and restart is logged. Only a child
that keeps dying (more than `max_deaths` times within `window_s`) stops the whole stack.

`mindchart run` polls `check()` once a second; the resilience tests run the same object in a
thread beside the stack they kill processes of.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mindchart_cli.stack import Stack, StackError

MAX_DEATHS = 5  # deaths of one child within WINDOW_S before the stack gives up
WINDOW_S = 120.0
FIRST_PAUSE_S = 0.5  # pause before the first restart; doubles with each recent death
MAX_PAUSE_S = 15.0


class KeepsDying(StackError):
    """A child died more than MAX_DEATHS times within WINDOW_S; the message names it."""


@dataclass
class Supervisor:
    stack: Stack
    log: Callable[[str], None]
    max_deaths: int = MAX_DEATHS
    window_s: float = WINDOW_S
    first_pause_s: float = FIRST_PAUSE_S
    max_pause_s: float = MAX_PAUSE_S
    deaths: dict[str, list[float]] = field(default_factory=dict)
    restarts: int = 0
    _due: dict[str, float] = field(default_factory=dict)  # label -> when to start it again

    def check(self) -> None:
        """Notice deaths, start what is due; raise KeepsDying when something keeps dying."""
        now = time.monotonic()
        for label, process in list(self.stack.processes.items()):
            if label in self._due or process.poll() is None:
                continue
            recent = [t for t in self.deaths.get(label, []) if now - t < self.window_s] + [now]
            self.deaths[label] = recent
            if len(recent) > self.max_deaths:
                raise KeepsDying(f"{label} died {len(recent)} times within {self.window_s:.0f}s "
                                 f"(exit code {process.returncode}); giving up")
            pause = min(self.max_pause_s, self.first_pause_s * 2 ** (len(recent) - 1))
            self._due[label] = now + pause
            self.log(f"{label} exited with code {process.returncode}; "
                     f"restarting it in {pause:.1f}s ({len(recent)} in {self.window_s:.0f}s)")
        for label, due in list(self._due.items()):
            if due <= now:
                del self._due[label]
                self.stack.respawn(label)
                self.restarts += 1
                self.log(f"{label} restarted (pid {self.stack.processes[label].pid})")

    def run_in_thread(self, interval_s: float = 0.2) -> Callable[[], None]:
        """Supervise until the returned function is called (tests); errors end the thread."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.check()
                except StackError as exc:
                    self.log(f"supervisor stopped: {exc}")
                    return

        thread = threading.Thread(target=loop, name="stack-supervisor", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(timeout=10)

        return halt


__all__ = ["KeepsDying", "Supervisor"]

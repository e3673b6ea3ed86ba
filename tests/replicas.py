"""Extra service processes beside the session's stack: another gateway, records or psychnotes
replica on the same datastores and keys (the stack's own environment for that service), started
the way the stack starts its services (mindchart_cli.stack.service_argv), on a free port."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from mindchart_cli import stack
from tests.conftest import RunningStack, free_port

READY_WITHIN_S = 60.0  # as the stack waits for its own services (Stack._wait_http)


@dataclass
class Replica:
    """One extra process of `service`; `env` is added to the stack's environment for it, and its
    output goes to `<log>.log` in the stack's log directory."""

    service: str
    log: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(url: str, process: subprocess.Popen[Any], name: str, *,
               within: float = READY_WITHIN_S, exited: Callable[[], object] | None = None) -> None:
    """Wait until the service `process` at `url` answers /readyz 200; fails if it exits first
    (with `exited()` as the message, when given) or is not ready `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        assert process.poll() is None, exited() if exited else f"{name} exited; see {name}.log"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{name} was not ready within {within:.0f} s"
        time.sleep(0.2)


@contextmanager
def running(live: RunningStack, *replicas: Replica) -> Iterator[None]:
    """Start every replica at once, wait until each answers /readyz 200, and stop them all on
    exit (SIGTERM, as the stack stops its own)."""
    with ExitStack() as cleanup:
        processes = []
        for replica in replicas:
            log = cleanup.enter_context(open(live.runner.log_dir / f"{replica.log}.log", "ab"))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **live.config.service_env(replica.service),
                   f"MINDCHART_{replica.service.upper()}_PORT": str(replica.port), **replica.env}
            process = subprocess.Popen(stack.service_argv(replica.service, "127.0.0.1", replica.port),
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
            cleanup.callback(process.wait, timeout=30)
            cleanup.callback(process.terminate)
            processes.append(process)
        for replica, process in zip(replicas, processes, strict=True):
            wait_ready(replica.url, process, replica.log)
        yield

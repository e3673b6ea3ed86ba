"""The gateway's CPU at rest (no client traffic) per second, with N backend replicas following its
revocation feed (issue 16): the stack's own records and psychnotes, plus `extra` pollers that are
mindchart_core.tokens.RevocationFeed exactly as a backend runs it, N of them in one side process.
CPU is utime + stime from /proc (bench.cost.cpu_seconds) of the gateway and of its datastore over
`seconds` of wall time, after a few seconds for the pollers to settle.

    uv run python -m bench.idle                        # extra pollers 0, 8 and 32, 20 s each
    uv run python -m bench.idle --extra 0,16 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import cost, harness, machine

SETTLE_SECONDS = 3.0


async def _poll(url: str, count: int) -> None:
    from mindchart_core import tokens

    # The feed secret the stack's backends read it with (its development one, under the data dir
    # given in the environment by `_rest`): the gateway answers nobody else.
    secret = tokens.feed_secret("", data_dir=Path(os.environ["MINDCHART_DATA_DIR"]), production=False)
    feeds = [tokens.RevocationFeed(url, secret=secret) for _ in range(count)]
    tasks = await asyncio.gather(*(feed.start() for feed in feeds))
    print("following", flush=True)  # every feed has had its first answer
    await asyncio.gather(*tasks)


def _feed_answers(gateway_url: str) -> float:
    """How many feed requests the gateway has answered, from its /metrics (every status)."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mindchart_http_requests_total{") and 'route="/oauth/revocations"' in line)


def _rest(stack: harness.BenchStack, extra: int, seconds: float) -> dict[str, float]:
    pollers = None
    if extra:
        pollers = subprocess.Popen(
            [sys.executable, "-m", "bench.idle", "--poll", f"{stack.gateway_url}/oauth/revocations",
             "--count", str(extra)], cwd=machine.REPO, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "MINDCHART_DATA_DIR": str(stack.config.data_dir)})
    try:
        if pollers is not None and pollers.stdout is not None:
            pollers.stdout.readline()  # "following": every poller has started
        time.sleep(SETTLE_SECONDS)
        pids = {"gateway": stack.pid("gateway")}
        if "datastore-gateway" in stack.runner.processes:
            pids["gateway-db"] = stack.pid("datastore-gateway")
        before = {label: cost.cpu_seconds(pid) for label, pid in pids.items()}
        answered = _feed_answers(stack.gateway_url)
        started = time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - started
        figures = {f"{label} CPU ms": 1000 * (cost.cpu_seconds(pid) - before[label]) / elapsed
                   for label, pid in pids.items()}
        figures["feed answers"] = (_feed_answers(stack.gateway_url) - answered) / elapsed
        return figures
    finally:
        if pollers is not None:
            pollers.terminate()
            pollers.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", default="0,8,32", help="extra pollers, comma-separated counts")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--poll", help=argparse.SUPPRESS)  # the side process: follow this feed
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        asyncio.run(_poll(args.poll, args.count))
        return
    with harness.running_stack() as stack:
        for extra in (int(n) for n in args.extra.split(",")):
            figures = _rest(stack, extra, args.seconds)
            detail = ", ".join(f"{label} {value:.1f}" for label, value in figures.items())
            print(f"backends following the feed: {2 + extra:3d}; per second at rest: {detail}", flush=True)


if __name__ == "__main__":
    main()

"""Subscription delivery, measured (issue 17): `uv run python -m bench.subscriptions [--writes N]`.

Starts the real stack (embedded datastores, three services, on free ports), a webhook receiver in
this process, registers a backend client with the receiver as its subscription endpoint, then:

1. writes/s without subscriptions: N progress notes created through the gateway, one at a time;
2. 100 active subscriptions to `note-created` (id-only, no filter), each handshaken;
3. writes/s with them: N more notes the same way (each write now also stores an outbox event);
4. delivery: every one of the 100 x N notifications is matched to its write's acknowledgement:
   latency (write acknowledged -> receiver got it) p50 and p99, and events delivered per second
   from the first acknowledgement to the last arrival.

Prints one JSON object and writes it to bench/results/subscriptions.json. Run it on a quiet
machine; the figures are for one records replica with the default 2 delivery workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from mindchart_cli import stack
from tests.actors import BackendClient, run_cli
from tests.records_resources import patient, progress_note

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
TOPIC = "https://mindchart.health/fhir/SubscriptionTopic/note-created"
SUBSCRIPTIONS = 100
RESULTS = Path(__file__).resolve().parent / "results" / "subscriptions.json"


class Receiver:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, str]] = []  # (time, kind, focus)
        self.keys: list[tuple[str, str]] = []  # (subscription, event number) of each event
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                moment = time.monotonic()
                params = body["entry"][0]["resource"]["parameter"]
                kind = next(p["valueCode"] for p in params if p["name"] == "type")
                focus = [
                    part["valueReference"]["reference"]
                    for p in params
                    if p["name"] == "notification-event"
                    for part in p["part"]
                    if part["name"] == "focus"
                ]
                sub = next(p["valueReference"]["reference"] for p in params if p["name"] == "subscription")
                numbers = [part["valueString"] for p in params if p["name"] == "notification-event"
                           for part in p["part"] if part["name"] == "event-number"]
                with receiver.lock:
                    receiver.arrivals.append((moment, kind, focus[0] if focus else ""))
                    receiver.keys.extend((sub, n) for n in numbers)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for _, k, _ in self.arrivals if k == kind)


async def write_notes(http: httpx.AsyncClient, patient_id: str, count: int) -> tuple[float, dict[str, float]]:
    """Create `count` notes one after another; (writes per second, note id -> acknowledgement time).
    One at a time, so the figure is what one write costs, not how writers contend."""
    acked: dict[str, float] = {}
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            queue.pop()
            response = await http.post("/DocumentReference", json=progress_note(patient_id))
            response.raise_for_status()
            acked[response.json()["id"]] = time.monotonic()

    started = time.monotonic()
    await worker()
    return count / (time.monotonic() - started), acked


async def until(done: Any, seconds: float) -> None:
    for _ in range(int(seconds / 0.2)):
        if done():
            return
        await asyncio.sleep(0.2)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(writes: int) -> dict[str, Any]:
    receiver = Receiver()
    ports = {name: _free_port() for name in stack.SERVICES}
    with tempfile.TemporaryDirectory() as tmp:
        config = stack.StackConfig(
            data_dir=Path(tmp),
            http_ports=ports,
            db_ports={name: _free_port() for name in stack.SERVICES},
            ephemeral=True,
            log_to_files=True,
            extra_env={"MINDCHART_GATEWAY_RATE_LIMIT_REQUESTS": str(10**9), "MINDCHART_LOG_LEVEL": "WARNING"},
        )
        runner = stack.Stack(config)
        runner.start()
        try:
            client = BackendClient("bench-subscriber", config.gateway_url)
            jwks = Path(tmp) / "bench.jwks.json"
            jwks.write_text(json.dumps(client.public_jwks()))
            result = run_cli(
                {
                    "MINDCHART_DATA_DIR": tmp,
                    **{f"MINDCHART_{n.upper()}_MONGO_URL": config.mongo_url(n) for n in stack.SERVICES},
                },
                "client",
                "create",
                "--id",
                client.client_id,
                "--auth",
                "private_key_jwt",
                "--jwks",
                str(jwks),
                "--scope",
                "system/*.cruds",
                "--subscription-endpoint",
                receiver.url,
            )
            assert result.returncode == 0, result.stderr
            token = client.token("system/*.cruds")
            async with httpx.AsyncClient(
                base_url=f"{config.gateway_url}/fhir",
                timeout=60,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
            ) as http:
                pid = (await http.post("/Patient", json=patient())).json()["id"]
                await write_notes(http, pid, 5)  # warm-up
                without, _ = await write_notes(http, pid, writes)
                body = {
                    "resourceType": "Subscription",
                    "status": "requested",
                    "reason": "bench",
                    "criteria": TOPIC,
                    "channel": {
                        "type": "rest-hook",
                        "endpoint": receiver.url,
                        "payload": "application/fhir+json",
                        "_payload": {
                            "extension": [{"url": f"{IG}/backport-payload-content", "valueCode": "id-only"}]
                        },
                    },
                }
                for _ in range(SUBSCRIPTIONS):
                    (await http.post("/Subscription", json=body)).raise_for_status()
                await until(lambda: receiver.count("handshake") >= SUBSCRIPTIONS, 120)
                await asyncio.sleep(1.0)  # let every subscription turn active
                with_subs, acked = await write_notes(http, pid, writes)
                expected = SUBSCRIPTIONS * writes
                await until(lambda: receiver.count("event-notification") >= expected, 600)
        finally:
            runner.stop()
            receiver.server.shutdown()
    by_note = {f"{config.gateway_url}/fhir/DocumentReference/{i}/_history/1": t for i, t in acked.items()}
    events = [(t, by_note[f]) for t, k, f in receiver.arrivals if k == "event-notification" and f in by_note]
    latencies = [arrival - ack for arrival, ack in events]
    first_ack = min(acked.values())
    last = max(t for t, _ in events)
    return {
        "subscriptions": SUBSCRIPTIONS,
        "writes": writes,
        "delivered": len(events),
        "expected": expected,
        "distinct_events": len(set(receiver.keys)),
        "duplicates": len(receiver.keys) - len(set(receiver.keys)),
        "unmatched": sum(1 for _, k, f in receiver.arrivals
                         if k == "event-notification" and f not in by_note),
        "writes_per_s_without": round(without, 1),
        "writes_per_s_with": round(with_subs, 1),
        "write_ratio_with_vs_without": round(with_subs / without, 2),
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "events_per_s": round(len(events) / (last - first_ack), 1),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.writes))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

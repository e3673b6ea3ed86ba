"""The write side of the HTTP limits (mindchart_core.http_limits): a client that stops reading a
large response is cut off once no byte of it has left the server for the send timeout, its
buffers are freed, the gateway releases the upstream connection behind it, and everyone else is
served meanwhile; a client that reads slowly but steadily still gets the whole response, however
long that takes. Spoken over raw sockets with a small receive buffer, so the kernel cannot hide
a stalled reader by buffering the whole response."""

from __future__ import annotations

import base64
import re
import socket
import time
import uuid

import httpx
import pytest

from tests.resilience.conftest import SEND_TIMEOUT_S, ResilientStack, report, rss_mib

MIB = 1024 * 1024
STALLED = 6  # connections that stop reading, per wave
# How long a test waits for the server to cut a stalled reader off: several send timeouts (the
# first look may see the last bytes of a kernel buffer drain), so a loaded machine cannot fail it.
PATIENCE_S = 6 * SEND_TIMEOUT_S + 20


def _cut_off_count(resilient: ResilientStack, service: str) -> float:
    """mindchart_http_cut_off_total{reason="stalled-reader"} at one service."""
    text = httpx.get(f"{resilient.direct_url(service)}/metrics", timeout=10).text
    match = re.search(r'^mindchart_http_cut_off_total\{reason="stalled-reader"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _connections_to(port: int) -> int:
    """Established TCP connections (IPv4, this host) whose remote end is `port`: for records'
    port, the gateway's upstream connections."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _request(port: int, path: str, token: str, *, rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.settimeout(PATIENCE_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Accept: application/fhir+json\r\nX-Request-ID: slowread-{uuid.uuid4().hex}\r\n"
                 f"\r\n".encode())
    return sock


def _read_response(sock: socket.socket, *, chunk: int = 1 << 20,
                   bytes_per_s: float | None = None) -> tuple[int, int]:
    """Read (at most `bytes_per_s` on average) until the server closes or the response is
    complete: (status, body bytes short of its Content-Length; 0 when complete)."""
    started, total = time.monotonic(), 0
    answer = b""
    head, body_len, expected = b"", 0, None
    try:
        while True:
            data = sock.recv(chunk)
            if not data:
                break
            total += len(data)
            if expected is None:
                answer += data
                if b"\r\n\r\n" not in answer:
                    continue
                head, _, rest = answer.partition(b"\r\n\r\n")
                found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                assert found, head[:500]
                expected, body_len, answer = int(found.group(1)), len(rest), b""
            else:
                body_len += len(data)
            if body_len >= expected:
                break
            if bytes_per_s:
                time.sleep(max(0.0, total / bytes_per_s - (time.monotonic() - started)))
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, (expected - body_len) if expected is not None else -1


@pytest.fixture(scope="module")
def big_page(fhir: httpx.Client) -> str:
    """A search whose one page is about 12 MiB: 14 DocumentReferences with ~870 KiB attachments
    (the gateway takes request bodies up to 1 MiB)."""
    created = fhir.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Slowread"}]})
    assert created.status_code == 201, created.text
    patient = created.json()["id"]
    blob = base64.b64encode(b"s" * (640 * 1024)).decode()
    for n in range(14):
        doc = fhir.post("/DocumentReference", json={
            "resourceType": "DocumentReference", "status": "current",
            "subject": {"reference": f"Patient/{patient}"},
            "description": f"slow-reader attachment {n}",
            "content": [{"attachment": {"contentType": "text/plain", "data": blob}}]})
        assert doc.status_code == 201, doc.text[:500]
    return f"/fhir/DocumentReference?subject=Patient/{patient}&_count=50"


def _token(fhir: httpx.Client) -> str:
    return str(fhir.auth.client.token(fhir.auth.scope))  # type: ignore[attr-defined]


def test_a_client_that_stops_reading_is_cut_off_and_holds_no_memory(
        resilient: ResilientStack, fhir: httpx.Client, big_page: str) -> None:
    whole = fhir.get(big_page.removeprefix("/fhir"))
    assert whole.status_code == 200 and len(whole.content) > 10 * MIB, len(whole.content)
    port = resilient.config.http_ports["gateway"]
    pids = {name: resilient.pid(name) for name in ("gateway", "records")}
    before = {name: rss_mib(pid) for name, pid in pids.items()}
    peak = dict(before)
    after_waves: list[dict[str, float]] = []
    served_meanwhile = 0
    for _wave in range(2):
        cut_before = _cut_off_count(resilient, "gateway")
        stalled = [_request(port, big_page, _token(fhir), rcvbuf=4096) for _ in range(STALLED)]
        # While they hold their connections, others are served: reads and the readiness check.
        for _ in range(3):
            assert fhir.get("/metadata").status_code == 200
            served_meanwhile += 1
        deadline = time.monotonic() + PATIENCE_S
        while (_cut_off_count(resilient, "gateway") < cut_before + STALLED
               and time.monotonic() < deadline):
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_mib(pid))
            time.sleep(0.5)
        # Once they read again, each gets what the kernels had buffered, then the end: the rest
        # of the ~12 MiB page was dropped with the connection. (Never cut off, each would now
        # get its whole page.)
        for sock in stalled:
            status, short = _read_response(sock)
            assert status == 200 and short > 1 * MIB, (
                f"a reader stalled for {PATIENCE_S:g} s got {status} and all but {short} bytes")
        assert _cut_off_count(resilient, "gateway") >= cut_before + STALLED
        # The gateway released the upstream connections those pages came through (a held one
        # would keep its page in records' buffers).
        records_port = resilient.config.http_ports["records"]
        while _connections_to(records_port) >= STALLED:
            assert time.monotonic() < deadline + 30, "the gateway still holds its upstream connections"
            time.sleep(0.5)
        after_waves.append({name: rss_mib(pid) for name, pid in pids.items()})
    # The upstream connections were released: records was not left holding its pages.
    assert httpx.get(f"{resilient.direct_url('records')}/readyz", timeout=10).status_code == 200
    assert fhir.get(big_page.removeprefix("/fhir")).status_code == 200
    grown = {name: peak[name] - before[name] for name in pids}
    assert grown["gateway"] < 32, f"the gateway grew by {grown['gateway']:.0f} MiB while stalled"
    # A second wave costs the gateway no more than the first: nothing of the first is still held.
    # (Records' RSS is reported, not bounded here: rendering six 12 MiB pages at once moves it by
    # tens of MiB either way; that it holds nothing is shown by the connections released above.)
    assert after_waves[1]["gateway"] - after_waves[0]["gateway"] < 24, after_waves
    report("slow readers: stalled at the gateway", connections=2 * STALLED,
           cut_off=2 * STALLED, served_meanwhile=served_meanwhile,
           gateway_rss_growth_mib=int(grown["gateway"]), records_rss_growth_mib=int(grown["records"]),
           fivexx=0)


def test_a_slow_but_steady_reader_gets_the_whole_response(
        resilient: ResilientStack, fhir: httpx.Client, big_page: str) -> None:
    """The bound is on stalls, not on the transfer: ~12 MiB at ~1 MiB/s takes several send
    timeouts, and arrives whole."""
    port = resilient.config.http_ports["gateway"]
    cut_before = _cut_off_count(resilient, "gateway")
    started = time.monotonic()
    sock = _request(port, big_page, _token(fhir), rcvbuf=64 * 1024)
    status, short = _read_response(sock, chunk=64 * 1024, bytes_per_s=1 * MIB)
    took = time.monotonic() - started
    assert status == 200 and short == 0, (status, short)
    assert took > 2 * SEND_TIMEOUT_S, f"the transfer took only {took:.1f} s: it proves nothing"
    assert _cut_off_count(resilient, "gateway") == cut_before
    report("slow readers: a steady slow reader", requests=1, complete=1, cut_off=0,
           seconds=int(took), send_timeout_s=int(SEND_TIMEOUT_S))

"""7. Bulk export (FHIR Bulk Data 2.0 system-level `$export`): resources per second from kick-off
to the last NDJSON line downloaded, and the peak RSS of records while it runs, at `export_small`
notes and at `notes_large` (measurement 3 calls `export_once` while each size is stored).
Answers "not available yet" until `GET /fhir/$export` answers 202. The token carries records'
`__export-restricted` scope, since every progress note is labelled R and would otherwise be
withheld."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.harness import EXPORT_RESTRICTED
from bench.measures.context import Context
from bench.report import Result, Row

KEY = "7-bulk-export"
TITLE = "7 bulk export ($export resources/s and records peak RSS as the store grows)"
POLL_LIMIT_S = 600
TOKEN_RENEW_S = 240  # the bench's backend tokens live 5 minutes; a long export outlives one


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def export_once(ctx: Context) -> dict[str, Any] | str:
    """One system-level export, end to end: figures, or why it could not run."""
    stack = ctx.stack
    scope = f"system/*.rs {EXPORT_RESTRICTED}"
    headers = {"Authorization": f"Bearer {stack.token(scope)}",
               "Accept": "application/fhir+json", "Prefer": "respond-async"}
    http = load.loopback_client(stack.gateway_url, concurrency=2, headers=headers, timeout=300)
    minted = time.perf_counter()

    def authorize() -> None:
        """Re-authenticate before the token lapses, as a Bulk Data client does (SMART Backend
        Services: a client asks for a new token when its short-lived one expires), so an export
        longer than one token's life is polled and downloaded, not answered 401."""
        nonlocal minted
        if time.perf_counter() - minted > TOKEN_RENEW_S:
            http.headers["Authorization"] = f"Bearer {stack.token(scope)}"
            minted = time.perf_counter()
    pid = stack.pid("records")
    baseline = peak = rss_mib(pid)
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        started = time.perf_counter()
        kickoff = await http.get("/fhir/$export")
        if kickoff.status_code != 202:
            return f"not available yet (GET /fhir/$export answered {kickoff.status_code})"
        status_url = kickoff.headers["content-location"]
        transient = 0
        while True:
            authorize()
            poll = await http.get(status_url)
            if poll.status_code == 200:
                break
            # Bulk Data 2.0 §bulk-data-status-request: a polling failure that does not fail the job
            # carries a `transient` issue code, and the client retries later. Counted, not hidden.
            if poll.status_code == 503 and _transient(poll):
                transient += 1
            elif poll.status_code != 202:
                return f"failed: the export status answered {poll.status_code}{_diagnostics(poll)}"
            if time.perf_counter() - started > POLL_LIMIT_S:
                return f"failed: no manifest within {POLL_LIMIT_S} s"
            await asyncio.sleep(min(float(poll.headers.get("retry-after") or 1), 1.0))
        manifest = poll.json()
        per_type: dict[str, int] = {}
        for output in manifest.get("output", []):
            authorize()
            async with http.stream("GET", output["url"],
                                   headers={"Accept": "application/fhir+ndjson"}) as body:
                if body.status_code != 200:  # an error body's lines are not exported resources
                    await body.aread()
                    return (f"failed: downloading a {output['type']} file answered "
                            f"{body.status_code}{_diagnostics(body)}")
                async for line in body.aiter_lines():
                    if line.strip():
                        per_type[output["type"]] = per_type.get(output["type"], 0) + 1
        elapsed = time.perf_counter() - started
    finally:
        sampling = False
        await sampler
        await http.aclose()
    resources = sum(per_type.values())
    return {"resources": resources, "per_type": per_type, "seconds": round(elapsed, 2),
            "resources_per_s": round(resources / elapsed, 1) if elapsed else 0.0,
            "rss_baseline_mib": round(baseline, 1), "rss_peak_mib": round(peak, 1),
            "errors_in_manifest": len(manifest.get("error", [])), "transient_polls": transient}


def _diagnostics(response: Any) -> str:
    """The OperationOutcome's diagnostics of a failed status poll (a failed job says why)."""
    try:
        issues = response.json().get("issue") or []
    except ValueError:
        return ""
    said = "; ".join(str(i.get("diagnostics")) for i in issues
                     if isinstance(i, dict) and i.get("diagnostics"))
    return f" ({said[:200]})" if said else ""


def _transient(response: Any) -> bool:
    try:
        issues = response.json().get("issue") or []
    except ValueError:
        return False
    return any(isinstance(i, dict) and i.get("code") == "transient" for i in issues)


async def run(ctx: Context) -> Result:
    result = Result(KEY, TITLE)
    runs: dict[str, Any] = ctx.shared.get("export", {})
    if not runs:  # measurement 3 did not run: export the store as it is
        runs = {"current": await export_once(ctx)}
    reasons = [r for r in runs.values() if isinstance(r, str)]
    if reasons:
        return result.unavailable(reasons[0]) if reasons[0].startswith("not available") \
            else result.failed(reasons[0])
    result.parameters = {"level": "system", "scope": f"system/*.rs {EXPORT_RESTRICTED}",
                         **ctx.plan.as_dict()}
    result.figures = runs

    result.rows = rows(runs)
    return result


def describe(r: dict[str, Any]) -> str:
    at = f"at {r['notes']} notes: " if "notes" in r else ""
    polls = r.get("transient_polls")
    retried = f", {polls} status polls answered 503 transient" if polls else ""
    return (f"{at}{r['resources']} resources in {r['seconds']:.1f} s = {r['resources_per_s']:.0f}/s, "
            f"RSS {r['rss_baseline_mib']:.0f} → peak {r['rss_peak_mib']:.0f} MiB{retried}")


def rows(runs: dict[str, Any]) -> list[Row]:
    if set(runs) != {"small", "large"}:
        return [Row(TITLE, describe(next(iter(runs.values()))))]
    small, large = runs["small"], runs["large"]
    scale = f"{large['resources'] / small['resources']:.0f}x the resources" if small["resources"] else ""
    return [
        Row("7 bulk export throughput, small → large store", f"{describe(small)}; {describe(large)}",
            large["resources_per_s"] / small["resources_per_s"] if small["resources_per_s"] else None,
            "— (no target; ≈ 1 means the rate holds)", None),
        Row(f"7 bulk export: records' peak RSS, small → large store ({scale})",
            f"{small['rss_peak_mib']:.0f} → {large['rss_peak_mib']:.0f} MiB (above the baseline before "
            f"each export: {small['rss_peak_mib'] - small['rss_baseline_mib']:.0f} → "
            f"{large['rss_peak_mib'] - large['rss_baseline_mib']:.0f} MiB)",
            large["rss_peak_mib"] / small["rss_peak_mib"] if small["rss_peak_mib"] else None,
            "— (no target; ≈ 1 means memory is bounded)", None),
    ]

"""What every result records about where it was measured: the machine and its load, the commit,
and the datastore. Absolute figures drift with all of these; ratios from one run are comparable."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pymongo import MongoClient

REPO = Path(__file__).resolve().parent.parent


def _first_match(path: str, pattern: str) -> str | None:
    try:
        match = re.search(pattern, Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def machine() -> dict[str, Any]:
    mem_kb = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor(),
        "memory_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except OSError:
            return ""

    # Other work in the same tree changes what runs: say whether the services differ from HEAD.
    dirty = run("status", "--porcelain", "--", "services", "libs", "cli")
    return {"commit": run("rev-parse", "HEAD") or None,
            "services_dirty": bool(dirty),
            "dirty_paths": sorted({line[3:] for line in dirty.splitlines()})[:50]}


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"***@{host}")
    return urlunsplit(parts)


def datastore(url: str, embedded: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "embedded SecantusDB" if embedded else "MongoDB", "url": redact(url)}
    try:
        client: MongoClient[dict[str, Any]]
        with MongoClient(url, serverSelectionTimeoutMS=3000) as client:
            build = client.admin.command("buildInfo")
        info["server_version"] = build.get("version")
        if build.get("secantusVersion"):
            info["secantus_version"] = build["secantusVersion"]
    except Exception as exc:  # a result is still worth writing without the version
        info["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return info


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

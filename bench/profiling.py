"""py-spy profiles of the slow side of a missed target, and a short summary of what they show.

py-spy samples the running service from outside (no code change, `--nonblocking` so the target is
never paused); the speedscope JSON it writes opens at https://www.speedscope.app. The summary
(`summarize`) says which packages and which Mindchart functions the samples fall in, so the
table can say where the time goes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OWN_CODE = ("/services/", "/libs/core/", "/bench/")
# Always at the bottom of every stack: not worth naming.
BASE_PACKAGES = frozenset({"python", "other", "click", "uvicorn"})


@dataclass
class Profile:
    path: Path
    samples: int = 0
    top_self: list[tuple[str, float]] = field(default_factory=list)
    top_own: list[tuple[str, float]] = field(default_factory=list)
    packages: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def describe(self, limit: int = 3) -> str:
        if self.error:
            return f"profile failed: {self.error}"
        packages = ", ".join(f"{name} {pct:.0f}%" for name, pct in self.packages[:limit + 2])
        if self.top_own:
            own = ", ".join(f"{name} {pct:.0f}%" for name, pct in self.top_own[:limit])
            return f"packages on stack: {packages or '—'}; innermost Mindchart code: {own}"
        hot = ", ".join(f"{name} {pct:.0f}%" for name, pct in self.top_self[:limit + 1])
        return f"packages on stack: {packages or '—'}; hottest frames: {hot or '—'}"

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "samples": self.samples, "error": self.error,
                "top_self_pct": self.top_self, "innermost_own_pct": self.top_own,
                "packages_inclusive_pct": self.packages}


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
         "--nonblocking", "--format", "speedscope", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes] | None, out: Path) -> Profile:
    if process is None:
        return Profile(out, error="py-spy is not installed (dev group)")
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        return Profile(out, error="py-spy did not finish")
    if process.returncode != 0 or not out.exists():
        return Profile(out, error=stderr.decode(errors="replace").strip()[-300:] or "no output")
    return summarize(out)


def _label(frame: dict[str, Any]) -> str:
    file = str(frame.get("file", ""))
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{frame.get('name', '?')} ({file})"


def _package(frame: dict[str, Any]) -> str:
    file = str(frame.get("file", ""))
    if "/site-packages/" in file:
        return file.split("/site-packages/", 1)[1].split("/", 1)[0]
    for marker in ("/services/", "/libs/core/src/", "/bench/"):
        if marker in file:
            return file.split(marker, 1)[1].split("/", 1)[0] if marker != "/bench/" else "bench"
    return "python" if "/lib/python3" in file else "other"


def summarize(path: Path, limit: int = 8) -> Profile:
    """Where the samples went, as % of all samples (every thread):

    - `top_self`: the frames on top of the stack (where the CPU was);
    - `top_own`: the innermost Mindchart function of each sample (which of our code paths);
    - `packages`: inclusive share of each package on the stack (pymongo, joserfc, starlette...).
    """
    document = json.loads(path.read_text())
    frames = document["shared"]["frames"]
    self_time: Counter[str] = Counter()
    innermost_own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0.0
    count = 0
    for profile in document.get("profiles", []):
        weights = profile.get("weights") or [1] * len(profile.get("samples", []))
        for stack, weight in zip(profile.get("samples", []), weights, strict=False):
            if not stack:
                continue
            total += weight
            count += 1
            self_time[_label(frames[stack[-1]])] += weight
            own = [i for i in stack if _is_own(frames[i])]
            if own:
                innermost_own[_label(frames[own[-1]])] += weight
            for package in {_package(frames[i]) for i in stack}:
                packages[package] += weight
    if not total:
        return Profile(path, error="no samples (was the process idle?)")

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * w / total, 1)) for name, w in counter.most_common(limit)]

    for base in BASE_PACKAGES:
        packages.pop(base, None)
    return Profile(path, samples=count, top_self=pct(self_time), top_own=pct(innermost_own),
                   packages=pct(packages))


def _is_own(frame: dict[str, Any]) -> bool:
    return any(marker in str(frame.get("file", "")) for marker in OWN_CODE)

"""Results: one JSON file per measurement under bench/results/<mode>/, and the printed table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import machine

RESULTS = machine.REPO / "bench" / "results"


@dataclass
class Row:
    """One line of the table: a figure, its value, its ratio against the target."""

    figure: str
    value: str
    ratio: float | None = None
    target: str = "—"
    met: bool | None = None  # None: no target, or nothing measured
    notes: list[str] = field(default_factory=list)  # printed under the table: profiles, op counts


@dataclass
class Result:
    key: str  # file name: "1-gateway-overhead"
    title: str
    status: str = "measured"  # measured | not available | failed
    rows: list[Row] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # raw numbers behind the rows
    profiles: list[dict[str, Any]] = field(default_factory=list)
    load_average_before: list[float] = field(default_factory=list)
    load_average_after: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def unavailable(self, why: str) -> Result:
        self.status = "not available"
        self.rows = [Row(self.title, why)]
        return self

    def failed(self, why: str) -> Result:
        self.status = "failed"
        self.rows = [Row(self.title, f"failed: {why}")]
        return self


def fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def fmt_met(row: Row) -> str:
    return "—" if row.met is None else ("yes" if row.met else "**no**")


def table(results: list[Result], *, with_notes: bool = True) -> str:
    """The markdown table; each row's notes are numbered and listed under it."""
    lines = ["| figure | value | ratio | target | met? |", "|---|---|---|---|---|"]
    notes: list[str] = []
    for result in results:
        for row in result.rows:
            refs = []
            for note in row.notes:
                notes.append(note)
                refs.append(f"[{len(notes)}]")
            value = row.value + (f" {' '.join(refs)}" if refs and with_notes else "")
            cells = [row.figure, value, fmt_ratio(row.ratio), row.target, fmt_met(row)]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if with_notes and notes:
        lines.append("")
        lines.extend(f"{n}. {note}" for n, note in enumerate(notes, start=1))
    return "\n".join(lines)


def write(result: Result, *, mode: str, context: dict[str, Any]) -> Path:
    folder = RESULTS / mode
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.key}.json"
    body = {
        "measurement": result.key,
        "title": result.title,
        "mode": mode,
        "status": result.status,
        "timestamp": machine.timestamp(),
        **context,
        "load_average_before": result.load_average_before,
        "load_average_after": result.load_average_after,
        "elapsed_s": round(result.elapsed_s, 1),
        "parameters": result.parameters,
        "rows": [asdict(r) for r in result.rows],
        "figures": result.figures,
        "profiles": result.profiles,
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


def read(path: Path) -> tuple[Result, str]:
    """A result written by `write`, and where it came from (its run's time and commit)."""
    body = json.loads(path.read_text())
    result = Result(body["measurement"], body["title"], body["status"],
                    rows=[Row(**row) for row in body["rows"]], parameters=body.get("parameters", {}),
                    figures=body.get("figures", {}), profiles=body.get("profiles", []))
    return result, f"{body['timestamp']}, commit {str(body.get('git', {}).get('commit'))[:12]}"


def summary(mode: str, header: str, this_run: list[Result]) -> str:
    """The table of this run's results, completed with the latest result of every measurement
    this run did not make (`--only`), each named with the run it came from."""
    results = {r.key: r for r in this_run}
    earlier = []
    for path in sorted((RESULTS / mode).glob("*.json")):
        if path.stem not in results and not path.name.endswith(".speedscope.json"):
            result, origin = read(path)
            results[result.key] = result
            earlier.append(f"{result.key} ({origin})")
    text = f"{header}\n\n{table(sorted(results.values(), key=lambda r: r.key))}\n"
    if earlier:
        text += "\nFrom earlier runs (not re-measured in this one): " + "; ".join(earlier) + ".\n"
    return text

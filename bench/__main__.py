"""`python -m bench [--quick] [--only 1,3]`: start the stack, run the measurements, print the table,
write one JSON per measurement under bench/results/<mode>/ (plus summary.md, which also lists the
latest result of each measurement `--only` left out). `--summary` rebuilds summary.md alone."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from types import ModuleType

from bench import machine, report
from bench.harness import running_stack
from bench.measures import export, floor, gateway, psychnotes, replicas, search, tokens, writes
from bench.measures.context import Context
from bench.plan import FULL, QUICK, Plan

# Run order: the reads first, on a small store; the bulk load of measurement 3 last but export,
# because everything read after it reads a store of `notes_large` notes.
MEASURES: list[tuple[str, ModuleType]] = [
    ("1", gateway), ("8", replicas), ("2", floor), ("5", tokens), ("6", psychnotes), ("4", writes),
    ("3", search), ("7", export),
]


def header(plan: Plan, context: dict[str, object]) -> str:
    mach = context["machine"]
    store = context["datastore"]
    git = context["git"]
    assert isinstance(mach, dict) and isinstance(store, dict) and isinstance(git, dict)
    version = store.get("secantus_version") or store.get("server_version")
    dirty = " (services differ from HEAD: work in progress in the tree)" if git.get("services_dirty") else ""
    return (f"Mindchart bench, {plan.mode} mode, {context['timestamp']}\n"
            f"machine: {mach['nproc']} cores {mach['cpu_model']}, {mach['memory_gib']} GiB, "
            f"load average at start {mach['load_average']}\n"
            f"datastore: {store['kind']} {version}; commit {str(git.get('commit'))[:12]}{dirty}")


def keep_logs(log_dir: Path, results: Path, number: str, lines: int = 300) -> list[str]:
    """The last lines of every process log (the stack's directory is temporary) beside the result."""
    results.mkdir(parents=True, exist_ok=True)
    kept = []
    for log in sorted(log_dir.glob("*.log")):
        target = results / f"{number}-{log.stem}.log"
        target.write_text("\n".join(log.read_text(errors="replace").splitlines()[-lines:]) + "\n")
        kept.append(str(target.relative_to(report.RESULTS.parent.parent)))
    return kept


async def run_all(plan: Plan, selected: set[str]) -> int:
    results: list[report.Result] = []
    started = time.monotonic()
    with running_stack() as stack:
        context: dict[str, object] = {
            "machine": machine.machine(), "git": machine.git(), "datastore": stack.datastore_info(),
            "timestamp": machine.timestamp(),
        }
        print(header(plan, context), flush=True)
        ctx = Context(stack, plan)
        for number, module in MEASURES:
            if number not in selected:
                continue
            print(f"… measurement {number}", flush=True)
            for stale in (report.RESULTS / plan.mode).glob(f"{number}-*"):  # an earlier run's files
                stale.unlink()
            before, t0 = machine.load_average(), time.monotonic()
            try:
                result = await module.run(ctx)
            except Exception as exc:  # one broken measurement must not hide the others
                result = report.Result(module.KEY, module.TITLE).failed(f"{type(exc).__name__}: {exc}"[:300])
            if result.status == "failed":  # raised, or a failure the measurement saw (a failed export)
                kept = keep_logs(stack.runner.log_dir, report.RESULTS / plan.mode, number)
                result.rows[0].notes.append(f"Process logs at the failure: {', '.join(kept)}.")
            result.load_average_before, result.load_average_after = before, machine.load_average()
            result.elapsed_s = time.monotonic() - t0
            report.write(result, mode=plan.mode, context=context)
            for line in report.table([result], with_notes=False).splitlines()[2:]:
                print(line, flush=True)
            results.append(result)
    finished = (f"load average at end {machine.load_average()}; "
                f"wall time {time.monotonic() - started:.0f} s")
    summary = report.summary(plan.mode, f"{header(plan, context)}\n{finished}", results)
    if plan.mode == "quick":
        summary += ("\nQuick mode: small N and short runs; measurement 3 compares "
                    f"{plan.notes_small} with at most {plan.notes_large} notes (not 1k with 100k).\n")
    (report.RESULTS / plan.mode).mkdir(parents=True, exist_ok=True)
    (report.RESULTS / plan.mode / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, short runs (under 3 minutes)")
    parser.add_argument("--only", default="", help="comma-separated measurement numbers, e.g. 1,3")
    parser.add_argument("--summary", action="store_true",
                        help="measure nothing: rebuild summary.md from the results already written")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.summary:
        title = (f"Mindchart bench, {plan.mode} mode: summary rebuilt {machine.timestamp()} "
                 f"from the latest result of each measurement")
        text = report.summary(plan.mode, title, [])
        (report.RESULTS / plan.mode / "summary.md").write_text(text)
        print(text)
        return 0
    selected = {n.strip() for n in args.only.split(",") if n.strip()} or {n for n, _ in MEASURES}
    return asyncio.run(run_all(plan, selected))


if __name__ == "__main__":
    sys.exit(main())

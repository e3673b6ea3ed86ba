"""Export workers: each records replica runs a few, all claiming jobs from the shared datastore.

A worker takes a job's lease (store.claim), renews it every `heartbeat_seconds` from a side task
and at every batch, and gives up the moment a renewal fails (the job was cancelled, or the lease
lapsed and another replica reclaimed it). A killed worker simply stops renewing; after
`lease_seconds` any replica's worker reclaims the job and resumes it (exporter.run). The sweeper
deletes expired jobs with their GridFS files.

A datastore that times out or drops the connection mid-export (a MongoDB primary election takes
seconds; the embedded datastore stalls every caller while one long write holds its lock) fails
the attempt, not the job: the worker waits, backing off, for the datastore to answer, then resumes
its own job as a new attempt (store.resume) without waiting for the lease to lapse. Those resumed
attempts are counted as `stalls`, apart from `max_attempts` (which stops a job that keeps killing
its workers), and bounded by `max_stalls`. Bulk Data 2.0's client meanwhile gets 503 `transient`
on its status polls and retries (§bulk-data-status-request).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from pymongo.errors import ConnectionFailure, CursorNotFound, ExecutionTimeout, PyMongoError

from mindchart_core import metrics
from records import background
from records.export import exporter, store
from records.export.settings import ExportSettings

log = structlog.get_logger(__name__)


def datastore_failed(exc: BaseException) -> bool:
    """The datastore, not the job, failed the attempt: unreachable or timed out, a cursor it lost
    (restarted or failed over: CursorNotFound on the next getMore), or an error the server labels
    retryable (NotWritablePrimary during an election, InterruptedAtShutdown, ...)."""
    if isinstance(exc, ConnectionFailure | CursorNotFound | ExecutionTimeout):
        return True
    return isinstance(exc, PyMongoError) and any(
        exc.has_error_label(label) for label in ("RetryableWriteError", "TransientTransactionError"))


class Workers(background.Workers):
    def __init__(self, db: store.Db, settings: ExportSettings, base_url: str) -> None:
        super().__init__()
        self.db, self.settings, self.base_url = db, settings, base_url

    def start(self) -> None:
        for index in range(max(0, self.settings.workers)):
            self.spawn(f"export-worker-{index}", self._loop(index))
        if self.settings.workers:
            self.spawn("export-sweeper", self._sweeper())

    async def _loop(self, index: int) -> None:
        while not self._stopping:
            try:
                job = await store.claim(self.db, f"{self.owner}/{index}", self.settings.lease_seconds)
            except ConnectionFailure:
                job = None
            if job is not None:
                try:
                    await self._run(job)
                except ConnectionFailure:  # its bookkeeping failed too: the lease lapses, and the
                    pass                   # job is claimed again; this worker lives on either way
                continue
            await self.idle(self.settings.poll_seconds)

    async def _run(self, job: dict[str, Any] | None) -> None:
        while job is not None:  # each pass one attempt; a datastore failure may resume the job
            job = await self._attempt(job)

    async def _attempt(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Run one attempt; the job's next attempt when the datastore failed this one, else None."""
        attempt, stalls = int(job["attempt"]), int(job.get("stalls", 0))
        refusal = ("Too many attempts" if attempt - stalls > self.settings.max_attempts else
                   "The datastore kept failing during the export" if stalls > self.settings.max_stalls
                   else None)
        if refusal:
            await store.fail(self.db, job["_id"], attempt, refusal, self.settings.file_ttl_seconds)
            metrics.EXPORT_JOBS.labels("failed").inc()
            return None
        lease = Lease(self.db, job["_id"], attempt, self.settings)
        heartbeat = asyncio.create_task(lease.beat())
        metrics.EXPORT_JOBS_RUNNING.inc()
        log.info("export_started", job=job["_id"], attempt=attempt, level=job["level"])
        try:
            await exporter.run(self.db, job, self.settings, self.base_url, lease.check)
            metrics.EXPORT_JOBS.labels("complete").inc()
            log.info("export_complete", job=job["_id"], attempt=attempt)
        except exporter.LeaseLost:
            log.warning("export_lease_lost", job=job["_id"], attempt=attempt)
            current = await store.job(self.db, job["_id"])
            if current is None or current["state"] == "cancelled":  # cancelled, maybe swept
                await store.discard_files(self.db, job["_id"])
                metrics.EXPORT_JOBS.labels("cancelled").inc()
        except Exception as exc:
            if datastore_failed(exc):
                log.warning("export_datastore_unavailable", job=job["_id"], attempt=attempt,
                            error_type=type(exc).__name__)
                return await self._resume(job["_id"], attempt)
            # A job that cannot run is failed, not retried forever.
            log.error("export_failed", job=job["_id"], attempt=attempt, error_type=type(exc).__name__)
            await store.fail(self.db, job["_id"], attempt, "The export failed on the server",
                             self.settings.file_ttl_seconds)
            metrics.EXPORT_JOBS.labels("failed").inc()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            metrics.EXPORT_JOBS_RUNNING.dec()
        return None

    async def _resume(self, job_id: str, attempt: int) -> dict[str, Any] | None:
        """Wait for the datastore to answer, then take the job on as a new attempt. Tried until the
        lease would lapse; after that any worker may claim the job as usual."""
        delay, waited = 0.25, 0.0
        while not self._stopping and waited < self.settings.lease_seconds:
            await asyncio.sleep(delay)
            waited += delay
            try:
                job = await store.resume(self.db, job_id, attempt, self.settings.lease_seconds)
            except ConnectionFailure:
                delay = min(delay * 2, 2.0)
                continue
            if job is not None:
                log.warning("export_resumed", job=job_id, attempt=int(job["attempt"]),
                            stalls=int(job.get("stalls", 0)))
            return job
        return None

    async def _sweeper(self) -> None:
        while not self._stopping:
            try:
                for job_id in await store.expired_jobs(self.db):
                    await store.delete_job(self.db, job_id)
                    log.info("export_expired", job=job_id)
            except PyMongoError as exc:  # tried again at the next sweep
                log.warning("export_sweep_failed", error_type=type(exc).__name__)
            await asyncio.sleep(self.settings.sweep_seconds)


class Lease:
    """The holder's side of a job lease: renewed on a timer and at every batch boundary."""

    def __init__(self, db: store.Db, job_id: str, attempt: int, settings: ExportSettings) -> None:
        self.db, self.job_id, self.attempt, self.settings = db, job_id, attempt, settings
        self.progress = "started"
        self.lost = False

    async def renew(self) -> None:
        if not await store.renew(self.db, self.job_id, self.attempt, self.settings.lease_seconds,
                                 self.progress[:95]):
            self.lost = True

    async def beat(self) -> None:
        while not self.lost:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            with contextlib.suppress(ConnectionFailure):
                await self.renew()

    async def check(self, progress: str) -> None:
        self.progress = progress
        if self.settings.batch_pause_seconds:
            await asyncio.sleep(self.settings.batch_pause_seconds)
        if not self.lost:
            await self.renew()
        if self.lost:
            raise exporter.LeaseLost


__all__ = ["Lease", "Workers"]

"""Export workers: each records replica runs a few, all claiming jobs from the shared datastore.

A worker takes a job's lease (store.claim), renews it every `heartbeat_seconds` from a side task
and at every batch, and gives up the moment a renewal fails (the job was cancelled, or the lease
lapsed and another replica reclaimed it). A killed worker simply stops renewing; after
`lease_seconds` any replica's worker reclaims the job and resumes it (exporter.run). The sweeper
deletes expired jobs with their GridFS files.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from pymongo.errors import ConnectionFailure

from mindchart_core import metrics
from records import background
from records.export import exporter, store
from records.export.settings import ExportSettings

log = structlog.get_logger(__name__)


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
                await self._run(job)
                continue
            await self.idle(self.settings.poll_seconds)

    async def _run(self, job: dict[str, Any]) -> None:
        attempt = int(job["attempt"])
        if attempt > self.settings.max_attempts:
            await store.fail(self.db, job["_id"], attempt, "Too many attempts",
                             self.settings.file_ttl_seconds)
            metrics.EXPORT_JOBS.labels("failed").inc()
            return
        lease = Lease(self.db, job["_id"], attempt, self.settings)
        heartbeat = asyncio.create_task(lease.beat())
        metrics.EXPORT_JOBS_RUNNING.inc()
        log.info("export_started", job=job["_id"], attempt=attempt, level=job["level"])
        try:
            await exporter.run(self.db, job, self.settings, self.base_url, lease.check)
            metrics.EXPORT_JOBS.labels("complete").inc()
            log.info("export_complete", job=job["_id"], attempt=attempt)
        except exporter.LeaseLost:
            log.info("export_lease_lost", job=job["_id"], attempt=attempt)
            current = await store.job(self.db, job["_id"])
            if current is None or current["state"] == "cancelled":  # cancelled, maybe swept
                await store.discard_files(self.db, job["_id"])
                metrics.EXPORT_JOBS.labels("cancelled").inc()
        except ConnectionFailure:
            log.warning("export_datastore_unavailable", job=job["_id"], attempt=attempt)
        except Exception as exc:  # a job that cannot run is failed, not retried forever
            log.error("export_failed", job=job["_id"], attempt=attempt, error_type=type(exc).__name__)
            await store.fail(self.db, job["_id"], attempt, "The export failed on the server",
                             self.settings.file_ttl_seconds)
            metrics.EXPORT_JOBS.labels("failed").inc()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            metrics.EXPORT_JOBS_RUNNING.dec()

    async def _sweeper(self) -> None:
        while not self._stopping:
            try:
                for job_id in await store.expired_jobs(self.db):
                    await store.delete_job(self.db, job_id)
                    log.info("export_expired", job=job_id)
            except ConnectionFailure:
                pass
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

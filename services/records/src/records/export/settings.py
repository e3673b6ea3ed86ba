"""Bulk export settings: environment variables prefixed MINDCHART_RECORDS_EXPORT_."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]


class ExportSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_RECORDS_EXPORT_", extra="ignore")

    # Exports of one client that may be queued or running at once; the next kick-off gets 429.
    max_concurrent_per_client: Count = 1
    # Resources per NDJSON file: a type with more is split over several files.
    resources_per_file: Count = 10_000
    # How long a finished export's files stay downloadable (the manifest's `Expires`).
    file_ttl_seconds: Count = 3600
    # A job's lease: a worker that has not renewed it for this long is presumed dead and any
    # replica may reclaim the job. Renewed every `heartbeat_seconds`. 30 s, like subscription and
    # CDex delivery leases: a renewal waits behind whatever the datastore is doing (the embedded
    # one answers nobody while it gathers a large read), and a lapse costs the job an attempt.
    lease_seconds: Seconds = 30.0
    heartbeat_seconds: Seconds = 2.0
    # Idle workers look for queued or abandoned jobs this often (kick-offs on this replica wake
    # its workers at once).
    poll_seconds: Seconds = 1.0
    sweep_seconds: Seconds = 30.0
    workers: Annotated[int, Field(ge=0)] = 2  # 0: this replica serves exports but runs none
    # Attempts lost to workers that died (a job that keeps killing its workers fails after these)
    # and attempts the datastore failed (timed out or unreachable) and the worker resumed.
    max_attempts: Count = 5
    max_stalls: Annotated[int, Field(ge=0)] = 20
    # Cursor batch: documents fetched per round trip, and the unit of progress and lease checks.
    batch_size: Count = 500
    # Patients whose exported-resource counts an export keeps in memory before writing them to
    # the disclosure log (one upsert each; about 120 bytes a patient, so 50,000 is ~6 MiB).
    # Resources come in export-slot order, not by patient, so once a type reaches more patients
    # than this the counts are written again every time the bound fills: upserts then grow with
    # the resources, not the patients (exporter.py).
    pending_patients: Count = 50_000
    # How long the first batch of one read of resources may take: the embedded datastore answers
    # it only after gathering the whole range read (store.time_sliced), longer than the datastore
    # timeout that bounds every other wait. A gather longer than `lease_seconds` also holds up the
    # lease's renewal on that datastore, and the job is then resumed as a new attempt.
    gather_seconds: Seconds = 30.0
    # Pause between batches: caps one export's load on the shared datastore (0 = full speed).
    batch_pause_seconds: Annotated[float, Field(ge=0)] = 0.0
    retry_after_seconds: Count = 2
    # Custom scope (SMART 2.2 §scopes: custom scopes start with `__`) that lets a client receive
    # resources labelled R or V (v3-Confidentiality) in exports; without it they are withheld and
    # counted in the manifest's `error[]`.
    restricted_scope: str = "__export-restricted"

    @model_validator(mode="after")
    def _renewed_within_the_lease(self) -> Self:
        """A lease renewed less often than it lapses would hand every running job to another
        replica: refuse to start with such a configuration rather than export twice."""
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        return self

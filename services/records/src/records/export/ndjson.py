"""NDJSON output files written straight into GridFS, one resource type per file, split at a size.

Lines are buffered up to one GridFS chunk and then written, so memory holds at most one chunk
per open file, whatever the export's size. A file is recorded in `export_files` only once it is
closed; its GridFS contents carry job id, type and attempt so an abandoned attempt's partial file
can be found and discarded (store.discard_files).
"""

from __future__ import annotations

from typing import Any

from records import subsetting
from records.export import store

CHUNK = 255 * 1024  # GridFS default chunk size


def elements_for(resource_type: str, elements: list[str] | None) -> frozenset[str] | None:
    """The root elements `_elements` keeps for a type, or None to keep everything
    (Bulk Data 2.0 §_elements: `Type.element` or `element` for every type)."""
    if not elements:
        return None
    wanted = {e.partition(".")[2] if "." in e else e for e in elements
              if "." not in e or e.partition(".")[0] == resource_type}
    if not wanted:
        return None
    return frozenset(wanted) | subsetting.mandatory_elements(resource_type)


def subset(raw: bytes, keep: frozenset[str] | None) -> bytes:
    """The stored resource reduced to `keep` and tagged SUBSETTED; untouched when keep is None."""
    return subsetting.subset_to(raw, keep)


class FileSeries:
    """Consecutive NDJSON files of one kind and type for one job attempt."""

    def __init__(self, db: store.Db, job_id: str, attempt: int, *, kind: str, line_type: str,
                 source_type: str, per_file: int) -> None:
        self.db, self.job_id, self.attempt = db, job_id, attempt
        self.kind, self.line_type, self.source_type = kind, line_type, source_type
        self.per_file = max(1, per_file)
        self.seq = 0
        self.total = 0
        self._upload: Any = None
        self._buffer = bytearray()
        self._count = 0
        self._patients: dict[str, int] = {}

    async def add(self, line: bytes, patients: list[str] | None = None) -> None:
        if self._upload is None:
            self.seq += 1
            grid_id = store.grid_id(self.job_id, self.source_type, self.kind, self.attempt, self.seq)
            self._upload = store.bucket(self.db).open_upload_stream_with_id(
                grid_id, f"{grid_id}.ndjson",
                metadata={"job": self.job_id, "type": self.source_type, "attempt": self.attempt,
                          "contentType": "application/fhir+ndjson"},
            )
        self._buffer += line
        self._buffer += b"\n"
        self._count += 1
        self.total += 1
        for patient in patients or ():
            self._patients[patient] = self._patients.get(patient, 0) + 1
        if len(self._buffer) >= CHUNK:
            await self._upload.write(bytes(self._buffer))
            self._buffer.clear()
        if self._count >= self.per_file:
            await self._finish()

    async def _finish(self) -> None:
        if self._upload is None:
            return
        if self._buffer:
            await self._upload.write(bytes(self._buffer))
            self._buffer.clear()
        await self._upload.close()
        await store.add_file(self.db, {
            "_id": store.new_id(), "job": self.job_id, "attempt": self.attempt, "kind": self.kind,
            "type": self.line_type, "source_type": self.source_type, "seq": self.seq,
            "count": self._count, "gridfs_id": self._upload._id,
            "patients": sorted(self._patients.items()),
        })
        self._upload, self._count, self._patients = None, 0, {}

    async def close(self) -> None:
        await self._finish()

    async def abort(self) -> None:
        if self._upload is not None:
            await self._upload.abort()
            self._upload = None
            self._buffer.clear()


__all__ = ["FileSeries", "elements_for", "subset"]

"""FHIR R4 JSON on the wire: content negotiation, bounded body reading, fast serialisation."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "text/json"}
_FORMAT_JSON = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_FORMAT_XML = {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}
DEFAULT_MAX_BODY = 1024 * 1024  # 1 MiB: larger notes belong in Binary/attachments


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class FhirResponse(Response):
    """Serialises with orjson; accepts pre-serialised bytes so reads never re-model resources."""

    media_type = f"{FHIR_JSON}; charset=utf-8"

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content)


def negotiate(request: Request) -> None:
    """406 unless the client accepts FHIR JSON (`_format` wins over `Accept`, R4 http.html)."""
    from mindchart_core import errors

    fmt = request.query_params.get("_format")
    if fmt is not None:
        base = fmt.split(";")[0].strip().lower()
        if base in _FORMAT_JSON:
            return
        if base in _FORMAT_XML:
            raise errors.NotAcceptable("Only JSON is supported (_format=json)")
        raise errors.NotAcceptable(f"Unsupported _format '{fmt[:40]}'")
    accept = request.headers.get("accept")
    if not accept:
        return
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in _JSON_TYPES or media in {"*/*", "application/*", "", "application/fhir+ndjson"}:
            return
    raise errors.NotAcceptable("Only application/fhir+json is supported")


_ETAG = re.compile(r'^(?:W/)?"(\d+)"$')


def if_match_version(request: Request) -> int | None:
    """The version an `If-Match: W/"n"` header names (R4 http.html §concurrency), or None."""
    from mindchart_core import errors

    header = request.headers.get("if-match")
    if header is None:
        return None
    match = _ETAG.match(header.strip())
    if match is None:
        raise errors.Invalid('If-Match must be an ETag such as W/"3"')
    return int(match.group(1))


async def _read_bounded(request: Request, max_bytes: int) -> bytes:
    """The whole body, never holding more than max_bytes of it."""
    from mindchart_core import errors

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise errors.PayloadTooLarge(f"Body exceeds the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise errors.PayloadTooLarge(f"Body exceeds the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_no_input(request: Request, operation: str, max_bytes: int = DEFAULT_MAX_BODY) -> None:
    """An operation without input parameters (e.g. `$sign`) takes no body or an empty
    `Parameters` (R4 operations.html: POST with a Parameters resource); anything else is 400."""
    from mindchart_core import errors

    raw = await _read_bounded(request, max_bytes)
    if not raw.strip():
        return
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters" or body.get("parameter"):
        raise errors.Invalid(f"{operation} takes no body or an empty Parameters resource")


async def read_json_body(
    request: Request, max_bytes: int = DEFAULT_MAX_BODY, *, media_types: frozenset[str] | None = None
) -> Any:
    """Read and parse a JSON body without ever holding more than max_bytes of it.

    `media_types` narrows what is accepted (e.g. JSON Patch); by default any FHIR JSON type.
    """
    from mindchart_core import errors

    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    accepted = media_types or _JSON_TYPES
    if media not in accepted:
        raise errors.UnsupportedMediaType(f"Send the body as {' or '.join(sorted(accepted))}")
    raw = await _read_bounded(request, max_bytes)
    if not raw.strip():
        raise errors.Structure("Request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.Structure(f"Body is not valid JSON: {exc.msg}") from None

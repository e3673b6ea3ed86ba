"""Search values extracted from a resource at write time, so every search is an indexed lookup.

Stored under `sp.<param>` as flat lists of scalars (multikey indexes). Tokens are stored in every
form a query can ask for (`system|code`, `|code` when there is no system, `code`, `system|`); strings
lower-cased without accents; references as `Type/id`; dates as a [lo, hi) range of UTC instants in
`sp.<param>_lo` / `sp.<param>_hi`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from records.resources import ResourceDef, SearchParam


def walk(node: Any, path: str) -> Iterator[Any]:
    """Every value at a dotted path, descending through lists."""
    if isinstance(node, list):
        for item in node:
            yield from walk(item, path)
        return
    if not path:
        yield node
        return
    head, _, rest = path.partition(".")
    if isinstance(node, dict) and head in node:
        yield from walk(node[head], rest)


def normalize_string(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def token_forms(system: str | None, code: str | None) -> list[str]:
    if not code:
        return [f"{system}|"] if system else []
    if system:
        return [f"{system}|{code}", code, f"{system}|"]
    return [f"|{code}", code]


def tokens_of(value: Any) -> list[str]:
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, str):
        return token_forms(None, value)[1:]  # a bare code: matches `code` only
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return [t for coding in value["coding"] for t in tokens_of(coding)]
    if "code" in value:  # Coding (and Quantity, ContactPoint-like code carriers)
        return token_forms(value.get("system"), value.get("code"))
    if isinstance(value.get("value"), str):  # Identifier
        return token_forms(value.get("system"), value["value"])
    if "system" in value:
        return token_forms(value.get("system"), None)
    return []


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [normalize_string(value)]
    if isinstance(value, dict):  # HumanName / Address: every text part is searchable
        parts: list[str] = []
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "state",
                    "postalCode", "country"):
            item = value.get(key)
            items = item if isinstance(item, list) else [item]
            parts.extend(normalize_string(i) for i in items if isinstance(i, str))
        return parts
    return []


def exact_strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        found: list[str] = []
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "state",
                    "postalCode", "country"):
            item = value.get(key)
            found.extend(i for i in (item if isinstance(item, list) else [item]) if isinstance(i, str))
        return found
    return []


def reference_of(value: Any, base_url: str) -> list[str]:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return []
    return [relative_reference(value["reference"], base_url)]


def relative_reference(ref: str, base_url: str) -> str:
    if base_url and ref.startswith(base_url.rstrip("/") + "/"):
        ref = ref[len(base_url.rstrip("/")) + 1:]
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


# --- dates -------------------------------------------------------------------------------------

_END_OF_TIME = datetime.max.replace(tzinfo=UTC)


def _next_year(lo: datetime) -> datetime:
    return lo.replace(year=lo.year + 1) if lo.year < 9999 else _END_OF_TIME


def _plus(lo: datetime, step: timedelta) -> datetime:
    try:
        return lo + step
    except OverflowError:  # the last day/second of year 9999
        return _END_OF_TIME


def date_range(text: str) -> tuple[datetime, datetime]:
    """The [lo, hi) instant range a FHIR date/dateTime/instant of any precision denotes."""
    value = text.strip()
    if len(value) == 4:
        lo = datetime(int(value), 1, 1, tzinfo=UTC)
        return lo, _next_year(lo)
    if len(value) == 7:
        lo = datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        hi = _next_year(lo).replace(month=1) if lo.month == 12 and lo.year < 9999 else (
            _END_OF_TIME if lo.month == 12 else lo.replace(month=lo.month + 1))
        return lo, hi
    if len(value) == 10:
        lo = datetime.fromisoformat(value).replace(tzinfo=UTC)
        return lo, _plus(lo, timedelta(days=1))
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    parsed = parsed.astimezone(UTC)
    if "." in value:
        return parsed, _plus(parsed, timedelta(milliseconds=1))
    step = timedelta(minutes=1) if value.count(":") == 1 else timedelta(seconds=1)
    return parsed, _plus(parsed, step)


def dates_of(value: Any) -> list[tuple[datetime, datetime]]:
    if isinstance(value, str):
        return [date_range(value)]
    if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        lo = date_range(value["start"])[0] if "start" in value else datetime.min.replace(tzinfo=UTC)
        hi = date_range(value["end"])[1] if "end" in value else datetime.max.replace(tzinfo=UTC)
        return [(lo, hi)]
    return []


def quantities_of(value: Any) -> list[float]:
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        return [float(value["value"])]
    return []


def extract_param(resource: dict[str, Any], param: SearchParam, base_url: str) -> dict[str, Any]:
    values: list[Any] = []
    for path in param.paths:
        for node in walk(resource, path):
            if param.type == "token":
                values.extend(tokens_of(node))
            elif param.type == "string":
                values.extend(strings_of(node))
            elif param.type == "reference":
                values.extend(reference_of(node, base_url))
            elif param.type == "quantity":
                values.extend(quantities_of(node))
            elif param.type == "date":
                values.extend(dates_of(node))
    if not values:
        return {}
    if param.type == "date":
        return {f"{param.name}_lo": min(v[0] for v in values),
                f"{param.name}_hi": max(v[1] for v in values)}
    if param.type == "string":  # `:exact` compares the text as written
        exact = sorted({e.strip() for path in param.paths for node in walk(resource, path)
                        for e in exact_strings_of(node)})
        return {param.name: sorted(set(values)), f"{param.name}_x": exact}
    return {param.name: sorted(set(values))}


def extract(resource: dict[str, Any], definition: ResourceDef, base_url: str) -> dict[str, Any]:
    """The `sp` sub-document stored beside a resource."""
    sp: dict[str, Any] = {}
    for param in definition.params:
        sp.update(extract_param(resource, param, base_url))
    security = resource.get("meta", {}).get("security", [])
    sp["_security"] = sorted({t for label in security for t in tokens_of(label)})
    sp["_tag"] = sorted({t for tag in resource.get("meta", {}).get("tag", []) for t in tokens_of(tag)})
    return sp


def patient_compartment(resource: dict[str, Any], definition: ResourceDef, base_url: str) -> list[str]:
    """Ids of the patients whose compartment holds this resource."""
    ids: set[str] = set()
    for path in definition.patient_compartment:
        if path == "id":
            ids.add(resource["id"])
            continue
        for node in walk(resource, path):
            for ref in reference_of(node, base_url):
                kind, _, ident = ref.partition("/")
                if kind == "Patient" and ident:
                    ids.add(ident)
    return sorted(ids)

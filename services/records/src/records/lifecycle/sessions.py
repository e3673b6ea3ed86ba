"""Session facts a signed note bills on: the CPT psychotherapy code in its Encounter's `type` and
the Encounter's `period`, checked when the note is signed, because an insurer denies a claim whose
documented time does not support its time-based code.

CPT time rule (the midpoint rule; AMA CPT 2013 psychiatry revisions, as summarised by payers and
billing guides, checked with the search tool): 90832 (30 min) 16-37 minutes, 90834 (45 min) 38-52,
90837 (60 min) 53 or more; 90839 (crisis, first 60 min) 30-74 minutes, +90840 once for each further
30 minutes beyond 74 (75-104 one unit, 105-134 two, ...). 90791, 90792 and the add-on 90785 are
not time-based here. The Encounter's codings use system `http://www.ama-assn.org/go/cpt`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from mindchart_core import errors

CPT = "http://www.ama-assn.org/go/cpt"
TIMED = {"90832": (16, 37), "90834": (38, 52), "90837": (53, None), "90839": (30, 74)}
CRISIS_ADD_ON = "90840"


def cpt_codes(encounter: dict[str, Any]) -> list[str]:
    return [str(c.get("code")) for t in encounter.get("type") or [] if isinstance(t, dict)
            for c in t.get("coding") or [] if isinstance(c, dict) and c.get("system") == CPT]


def minutes(encounter: dict[str, Any]) -> float | None:
    period = encounter.get("period") or {}
    try:
        start = datetime.fromisoformat(str(period["start"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(period["end"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    if start.tzinfo is None or end.tzinfo is None:
        return None
    return (end - start).total_seconds() / 60


def check(encounter: dict[str, Any], reference: str) -> None:
    """422 naming the mismatch between the session's length and its time-based CPT codes."""
    codes = cpt_codes(encounter)
    timed = [c for c in codes if c in TIMED]
    add_ons = codes.count(CRISIS_ADD_ON)
    if not timed and not add_ons:
        return
    length = minutes(encounter)
    if length is None:
        raise errors.Unprocessable(
            f"{reference} has the time-based CPT code {(timed or [CRISIS_ADD_ON])[0]} but its period "
            "lacks a start and an end with time zones, so the session's length is unknown",
            expression=["Encounter.period"])
    shown = round(length)
    if add_ons and "90839" not in timed:
        raise errors.Unprocessable(f"{reference}: +90840 is an add-on to 90839 and is billed only with it",
                                   expression=["Encounter.type"])
    for code in timed:
        low, high = TIMED[code]
        if length < low or (high is not None and length > high and code != "90839"):
            span = f"{low}-{high}" if high is not None else f"{low} or more"
            raise errors.Unprocessable(
                f"{reference} lasted {shown} minutes, which does not support CPT {code} "
                f"({span} minutes)", expression=["Encounter.type", "Encounter.period"])
        if code == "90839":
            wanted = max(0, math.ceil((length - 74) / 30))
            if add_ons != wanted:
                raise errors.Unprocessable(
                    f"{reference} lasted {shown} minutes: CPT 90839 takes {wanted} unit(s) of +90840 "
                    f"(one for each 30 minutes beyond 74), not {add_ons}",
                    expression=["Encounter.type", "Encounter.period"])


__all__ = ["CPT", "check", "cpt_codes", "minutes"]

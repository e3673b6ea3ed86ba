"""PHQ-9 and GAD-7: items, scoring, severity, and the US Core screening Observations they become.

US Core Observation Screening Assessment (shared/STANDARDS.md §5): category `survey`, LOINC
`code`, `subject`, `effectiveDateTime`, a panel Observation with no value whose `hasMember`
points at the item Observations and the total. Panels: PHQ-9 44249-1 (total 44261-6, items
44250-9 ... 44260-8, item 9 = 44260-8 self-harm thoughts), GAD-7 69737-5 (total 70274-6). Item
answers are the LOINC answer list LL358-3 (LA6568-5 Not at all = 0, LA6569-3 Several days = 1,
LA6570-1 More than half the days = 2, LA6571-9 Nearly every day = 3); totals are `valueQuantity`
in UCUM `{score}`. Severity bands (Kroenke 2001, Spitzer 2006): PHQ-9 0-4 minimal, 5-9 mild,
10-14 moderate, 15-19 moderately severe, 20-27 severe; GAD-7 0-4, 5-9, 10-14, 15-21.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOINC = "http://loinc.org"
SURVEY = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey",
          "display": "Survey"}
SCREENING_PROFILE = ("http://hl7.org/fhir/us/core/StructureDefinition/"
                     "us-core-observation-screening-assessment")
RESTRICTED_BH = [
    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "BH"},
]
ANSWERS = (("LA6568-5", "Not at all"), ("LA6569-3", "Several days"),
           ("LA6570-1", "More than half the days"), ("LA6571-9", "Nearly every day"))


@dataclass(frozen=True)
class Instrument:
    key: str
    name: str
    panel: str
    panel_display: str
    total: str
    total_display: str
    items: tuple[tuple[str, str], ...]  # (LOINC, question)
    bands: tuple[tuple[int, int, str], ...]  # (low, high, label)

    @property
    def maximum(self) -> int:
        return 3 * len(self.items)

    def severity(self, total: int) -> str:
        return next(label for low, high, label in self.bands if low <= total <= high)


PHQ9 = Instrument(
    "phq9", "PHQ-9", "44249-1", "PHQ-9 quick depression assessment panel", "44261-6",
    "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
    (("44250-9", "Little interest or pleasure in doing things"),
     ("44255-8", "Feeling down, depressed, or hopeless"),
     ("44259-0", "Trouble falling or staying asleep, or sleeping too much"),
     ("44254-1", "Feeling tired or having little energy"),
     ("44251-7", "Poor appetite or overeating"),
     ("44258-2", "Feeling bad about yourself, or that you are a failure or have let yourself or your "
                 "family down"),
     ("44252-5", "Trouble concentrating on things, such as reading or watching television"),
     ("44253-3", "Moving or speaking so slowly that other people could have noticed, or being so "
                 "fidgety or restless that you have been moving around a lot more than usual"),
     ("44260-8", "Thoughts that you would be better off dead, or of hurting yourself in some way")),
    ((0, 4, "minimal"), (5, 9, "mild"), (10, 14, "moderate"), (15, 19, "moderately severe"),
     (20, 27, "severe")),
)
GAD7 = Instrument(
    "gad7", "GAD-7", "69737-5", "Generalized anxiety disorder 7 item (GAD-7)", "70274-6",
    "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]",
    (("69725-0", "Feeling nervous, anxious, or on edge"),
     ("68509-9", "Not being able to stop or control worrying"),
     ("69733-4", "Worrying too much about different things"),
     ("69734-2", "Trouble relaxing"),
     ("69735-9", "Being so restless that it is hard to sit still"),
     ("69689-8", "Becoming easily annoyed or irritable"),
     ("69736-7", "Feeling afraid, as if something awful might happen")),
    ((0, 4, "minimal"), (5, 9, "mild"), (10, 14, "moderate"), (15, 21, "severe")),
)
INSTRUMENTS = {i.key: i for i in (PHQ9, GAD7)}
SELF_HARM_ITEM = "44260-8"


class ScoreError(ValueError):
    """An answer is missing or out of range; the message is safe to show."""


def read_answers(instrument: Instrument, form: dict[str, str]) -> list[int]:
    answers = []
    for n, (_, question) in enumerate(instrument.items, start=1):
        value = form.get(f"{instrument.key}-{n}", "")
        if value not in ("0", "1", "2", "3"):
            raise ScoreError(f"{instrument.name} question {n} ({question[:40]}...) needs an answer")
        answers.append(int(value))
    return answers


def observations(instrument: Instrument, answers: list[int], *, patient: str, encounter: str,
                 performer: str, effective: str) -> list[tuple[str, dict[str, Any]]]:
    """(fullUrl, resource) pairs for one transaction: items, total, then the panel pointing at
    them (urn:uuid references, resolved by records on commit)."""
    import uuid

    common: dict[str, Any] = {
        "status": "final", "meta": {"profile": [SCREENING_PROFILE], "security": RESTRICTED_BH},
        "category": [{"coding": [SURVEY]}], "subject": {"reference": patient},
        "encounter": {"reference": encounter}, "effectiveDateTime": effective,
        "performer": [{"reference": performer}],
    }
    entries: list[tuple[str, dict[str, Any]]] = []
    for (code, question), answer in zip(instrument.items, answers, strict=True):
        la, label = ANSWERS[answer]
        entries.append((f"urn:uuid:{uuid.uuid4()}", {
            "resourceType": "Observation", **common,
            "code": {"coding": [{"system": LOINC, "code": code, "display": question}]},
            "valueCodeableConcept": {"coding": [{"system": LOINC, "code": la, "display": label}],
                                     "text": f"{label} ({answer})"},
        }))
    total = sum(answers)
    entries.append((f"urn:uuid:{uuid.uuid4()}", {
        "resourceType": "Observation", **common,
        "code": {"coding": [{"system": LOINC, "code": instrument.total,
                             "display": instrument.total_display}]},
        "valueQuantity": {"value": total, "unit": "{score}", "system": "http://unitsofmeasure.org",
                          "code": "{score}"},
        "interpretation": [{"text": instrument.severity(total)}],
    }))
    entries.append((f"urn:uuid:{uuid.uuid4()}", {
        "resourceType": "Observation", **common,
        "code": {"coding": [{"system": LOINC, "code": instrument.panel,
                             "display": instrument.panel_display}]},
        "hasMember": [{"reference": url} for url, _ in entries],
    }))
    return entries


# -- the chart: totals over time, severity bands behind them (server-rendered SVG) ------------

BAND_FILLS = ("band-0", "band-1", "band-2", "band-3", "band-4")


@dataclass
class Chart:
    instrument: Instrument
    points: list[tuple[str, int]]  # (date, total), oldest first
    width: int = 560
    height: int = 200
    pad: int = 36

    def y(self, value: float) -> float:
        inner = self.height - 2 * self.pad
        return round(self.height - self.pad - inner * value / self.instrument.maximum, 1)

    label_room: int = 120  # the band labels sit right of the last point, never under it

    def x(self, index: int) -> float:
        inner = self.width - 2 * self.pad - self.label_room
        if len(self.points) <= 1:
            return self.pad + inner / 2
        return round(self.pad + inner * index / (len(self.points) - 1), 1)

    def bands(self) -> list[dict[str, Any]]:
        """Each band spans its scores ±0.5, so a total sits inside its band, never on an edge."""
        out = []
        for n, (low, high, label) in enumerate(self.instrument.bands):
            top = self.y(min(high + 0.5, self.instrument.maximum))
            bottom = self.y(max(low - 0.5, 0))
            out.append({"y": top, "height": round(bottom - top, 1), "label": label, "low": low,
                        "high": high, "fill": BAND_FILLS[n]})
        return out

    def polyline(self) -> str:
        return " ".join(f"{self.x(i)},{self.y(v)}" for i, (_, v) in enumerate(self.points))

    def dots(self) -> list[dict[str, Any]]:
        return [{"x": self.x(i), "y": self.y(v), "date": d, "value": v,
                 "severity": self.instrument.severity(v)} for i, (d, v) in enumerate(self.points)]

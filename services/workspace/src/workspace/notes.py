"""Progress notes as the workspace writes them: templates, the markdown they become, the
interventions pick-list, and the CPT code a session's length suggests.

The note body is `text/markdown` with one `## Heading` per section, the convention of the README
("Progress notes (records)"): SOAP (Subjective, Objective, Assessment, Plan), DAP (Data,
Assessment, Plan), and BIRP (Behavior, Intervention, Response, Plan), plus an `## Interventions`
list of the interventions and modalities used (HIPAA 164.501 puts modalities in the record, not
in psychotherapy notes). Parsing reads the same headings back, so a draft reloads field by field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

TEMPLATES: dict[str, tuple[str, ...]] = {
    "DAP": ("Data", "Assessment", "Plan"),
    "SOAP": ("Subjective", "Objective", "Assessment", "Plan"),
    "BIRP": ("Behavior", "Intervention", "Response", "Plan"),
}
TEMPLATE_NAMES = {"DAP": "DAP (Data, Assessment, Plan)",
                  "SOAP": "SOAP (Subjective, Objective, Assessment, Plan)",
                  "BIRP": "BIRP (Behavior, Intervention, Response, Plan)"}
INTERVENTIONS_HEADING = "Interventions"
SAFETY_HEADING = "Safety"

# Interventions and modalities therapists document (the pick-list; ids are stable, labels shown).
INTERVENTIONS: dict[str, str] = {
    "cognitive-restructuring": "Cognitive restructuring",
    "behavioral-activation": "Behavioral activation",
    "motivational-interviewing": "Motivational interviewing",
    "dbt-skills": "DBT skills training",
    "exposure": "Exposure",
    "mindfulness": "Mindfulness",
    "psychoeducation": "Psychoeducation",
    "safety-planning": "Safety planning",
    "problem-solving": "Problem-solving therapy",
    "act": "Acceptance and commitment (ACT)",
    "emdr": "EMDR",
    "relaxation": "Relaxation training",
    "sleep-hygiene": "Sleep hygiene",
    "supportive": "Supportive therapy",
    "family-systems": "Family systems",
    "homework-review": "Homework review",
}


def section_field(heading: str) -> str:
    return "section-" + heading.lower()


@dataclass
class NoteDraft:
    """What the note form holds. Session times live on the Encounter, not in the markdown."""

    template: str
    sections: dict[str, str]
    interventions: list[str]
    safety: str = ""

    @classmethod
    def empty(cls, template: str) -> NoteDraft:
        return cls(template, {h: "" for h in TEMPLATES[template]}, [])

    @classmethod
    def from_form(cls, form: dict[str, str], chosen: list[str]) -> NoteDraft:
        template = form.get("template", "DAP")
        if template not in TEMPLATES:
            template = "DAP"
        sections = {h: form.get(section_field(h), "").strip() for h in TEMPLATES[template]}
        return cls(template, sections, [i for i in chosen if i in INTERVENTIONS],
                   form.get("safety", "").strip())

    def markdown(self) -> str:
        parts = [f"# {self.template} progress note"]
        for heading in TEMPLATES[self.template]:
            parts.append(f"## {heading}\n\n{self.sections.get(heading, '').strip()}")
        if self.interventions:
            items = "\n".join(f"- {INTERVENTIONS[i]}" for i in self.interventions)
            parts.append(f"## {INTERVENTIONS_HEADING}\n\n{items}")
        if self.safety:
            parts.append(f"## {SAFETY_HEADING}\n\n{self.safety}")
        return "\n\n".join(parts) + "\n"


_HEADING = re.compile(r"^## (.+?)\s*$", re.MULTILINE)
_LABEL_TO_ID = {label: key for key, label in INTERVENTIONS.items()}


def parse_markdown(text: str) -> NoteDraft:
    """Read a note written in the heading convention back into its fields. A note in another
    form (e.g. the demo's plain text) comes back whole in the first section of DAP."""
    pieces = _HEADING.split(text)
    found: dict[str, str] = {}
    for i in range(1, len(pieces) - 1, 2):
        found[pieces[i].strip()] = pieces[i + 1].strip()
    headings = set(found) - {INTERVENTIONS_HEADING, SAFETY_HEADING}
    template = next((name for name, hs in TEMPLATES.items() if set(hs) == headings), None)
    if template is None:
        return NoteDraft("DAP", {"Data": text.strip(), "Assessment": "", "Plan": ""}, [])
    chosen = [_LABEL_TO_ID[line[2:].strip()] for line in found.get(INTERVENTIONS_HEADING, "").splitlines()
              if line.startswith("- ") and line[2:].strip() in _LABEL_TO_ID]
    return NoteDraft(template, {h: found[h] for h in TEMPLATES[template]}, chosen,
                     found.get(SAFETY_HEADING, ""))


# -- session length and CPT -------------------------------------------------------------------

SESSION_KINDS = {"psychotherapy": "Psychotherapy", "intake": "Intake (diagnostic evaluation)",
                 "crisis": "Crisis psychotherapy"}
CPT_DISPLAY = {
    "90791": "Psychiatric diagnostic evaluation",
    "90832": "Psychotherapy, 30 minutes with patient",
    "90834": "Psychotherapy, 45 minutes with patient",
    "90837": "Psychotherapy, 60 minutes with patient",
    "90839": "Psychotherapy for crisis, first 60 minutes",
    "90840": "Psychotherapy for crisis, each additional 30 minutes",
}


def duration_minutes(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None or end <= start:
        return None
    return int((end - start).total_seconds() // 60)


def suggest_cpt(kind: str, minutes: int | None) -> list[str]:
    """CPT codes a session suggests (the therapist confirms; nothing is billed here).

    CPT's time rule: a unit of time is attained once the midpoint is passed, so psychotherapy is
    90832 for 16-37 minutes, 90834 for 38-52 and 90837 for 53 or more; under 16 minutes no
    psychotherapy code is reported. Crisis psychotherapy: 90839 covers 30-74 minutes, and each
    further 30 minutes past 60 (a unit once 16 of them are reached: 75-104, 105-134, ...) adds
    90840; a crisis session under 30 minutes is reported as 90832. 90791 (intake evaluation) has
    no time requirement. Checked against AMA-based billing guides (bonfirerevenue.com,
    helloalma.com, headway.co, empr.com "2013 CPT changes").
    """
    if kind == "intake":
        return ["90791"]
    if minutes is None or minutes < 16:
        return []
    if kind == "crisis" and minutes >= 30:
        # 75-104 minutes: one 90840, 105-134: two, ...
        units = (minutes - 75) // 30 + 1 if minutes >= 75 else 0
        return ["90839"] + ["90840"] * units
    if minutes <= 37:
        return ["90832"]
    if minutes <= 52:
        return ["90834"]
    return ["90837"]

"""The workspace's pure note logic: CPT suggestions from session length and the markdown heading
convention read back field by field."""

from __future__ import annotations

import pytest

from workspace import notes, screening


@pytest.mark.parametrize(("kind", "minutes", "codes"), [
    ("psychotherapy", 15, []), ("psychotherapy", 16, ["90832"]), ("psychotherapy", 37, ["90832"]),
    ("psychotherapy", 38, ["90834"]), ("psychotherapy", 52, ["90834"]), ("psychotherapy", 53, ["90837"]),
    ("psychotherapy", 90, ["90837"]), ("intake", None, ["90791"]), ("intake", 75, ["90791"]),
    ("crisis", 29, ["90832"]), ("crisis", 30, ["90839"]), ("crisis", 74, ["90839"]),
    ("crisis", 75, ["90839", "90840"]), ("crisis", 104, ["90839", "90840"]),
    ("crisis", 105, ["90839", "90840", "90840"]), ("psychotherapy", None, []),
])
def test_cpt_follows_the_time_rule(kind: str, minutes: int | None, codes: list[str]) -> None:
    assert notes.suggest_cpt(kind, minutes) == codes


@pytest.mark.parametrize("template", sorted(notes.TEMPLATES))
def test_a_note_reads_back_field_by_field(template: str) -> None:
    sections = {h: f"{h} text\nsecond line" for h in notes.TEMPLATES[template]}
    draft = notes.NoteDraft(template, sections, ["exposure", "mindfulness"], "Safety plan reviewed.")
    text = draft.markdown()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        f"## {h}" for h in notes.TEMPLATES[template]] + ["## Interventions", "## Safety"]
    back = notes.parse_markdown(text)
    assert (back.template, back.sections, back.interventions, back.safety) == (
        template, sections, ["exposure", "mindfulness"], "Safety plan reviewed.")


def test_plain_text_notes_open_whole_in_the_first_section() -> None:
    back = notes.parse_markdown("S: low mood.\nP: weekly CBT.")
    assert back.template == "DAP" and back.sections["Data"] == "S: low mood.\nP: weekly CBT."


def test_severity_bands() -> None:
    assert [screening.PHQ9.severity(v) for v in (0, 4, 5, 9, 10, 14, 15, 19, 20, 27)] == [
        "minimal", "minimal", "mild", "mild", "moderate", "moderate", "moderately severe",
        "moderately severe", "severe", "severe"]
    assert [screening.GAD7.severity(v) for v in (4, 5, 10, 15, 21)] == [
        "minimal", "mild", "moderate", "severe", "severe"]
    panel = screening.observations(screening.PHQ9, [1] * 9, patient="Patient/p", encounter="Encounter/e",
                                   performer="Practitioner/t", effective="2026-11-30T10:00:00Z")
    assert [r["code"]["coding"][0]["code"] for _, r in panel][-2:] == ["44261-6", "44249-1"]
    assert panel[-1][1]["hasMember"] == [{"reference": url} for url, _ in panel[:-1]]

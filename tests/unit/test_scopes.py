"""SMART App Launch 2.2 scopes as the shared library parses them (mindchart_core.scopes)."""

from __future__ import annotations

import pytest

from mindchart_core import scopes


@pytest.mark.parametrize(("word", "letters"), [
    ("patient/Observation.rs", "rs"),
    ("user/*.cruds", "cruds"),
    ("system/Patient.read", "rs"),  # v1
    ("patient/*.write", "cud"),  # v1
    ("user/Observation.*", "cruds"),  # v1
    ("patient/Observation.c", "c"),
])
def test_v2_and_v1_permissions(word: str, letters: str) -> None:
    parsed = scopes.parse(word)
    assert len(parsed.clinical) == 1
    assert parsed.clinical[0].permissions == frozenset(letters)
    assert str(parsed) == word  # re-issued as asked


@pytest.mark.parametrize("word", ["patient/Observation.dus", "patient/Observation.", "doctor/Patient.rs",
                                  "patient/observation.rs", "patient/Observation.rs?", "user/*.x"])
def test_malformed_clinical_scopes_are_never_granted(word: str) -> None:
    parsed = scopes.parse(word)
    assert not parsed.clinical
    if word.startswith(("patient/", "user/", "system/")):
        assert word not in parsed.other  # dropped, not carried along as an opaque scope
    assert not parsed.allows("Observation", "read") and not parsed.allows("Patient", "read")


def test_interactions_map_to_letters() -> None:
    granted = scopes.parse("patient/Observation.rs user/Patient.cu")
    assert granted.allows("Observation", "read") and granted.allows("Observation", "search-type")
    assert granted.allows("Observation", "history-instance") and not granted.allows("Observation", "create")
    assert granted.allows("Patient", "update") and granted.allows("Patient", "patch")
    assert not granted.allows("Patient", "delete") and not granted.allows("Patient", "read")
    assert [s.context for s in granted.matching("Observation", "read", ("user",))] == []


def test_granular_scope_params_and_capping() -> None:
    survey = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|survey"
    parsed = scopes.parse(survey)
    assert parsed.clinical[0].params == (
        ("category", "http://terminology.hl7.org/CodeSystem/observation-category|survey"),)
    registered = scopes.parse(f"{survey} user/*.rs launch openid")
    # A narrower registration cannot yield the wider scope; the same granular scope passes.
    capped = scopes.cap(scopes.parse(f"patient/Observation.rs {survey} user/Patient.r openid offline_access"),
                        registered)
    assert [s.text for s in capped.clinical] == [survey, "user/Patient.r"]
    assert capped.other == frozenset({"openid"})


def test_cap_never_widens_permissions_or_context() -> None:
    registered = scopes.parse("patient/*.rs")
    capped = scopes.cap(scopes.parse("patient/Observation.cruds user/Observation.rs patient/Patient.r"), registered)
    assert [s.text for s in capped.clinical] == ["patient/Patient.r"]

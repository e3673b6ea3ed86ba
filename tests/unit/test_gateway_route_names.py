"""The gateway's metrics and access log name every operation the backends serve (`/fhir/{type}/
{id}/$sign`), and only those: an operation a client invents stays `{operation}`, so the label
set stays bounded whatever clients send."""

from __future__ import annotations

import importlib
import pkgutil
import re

from fastapi import APIRouter

from gateway import proxy


def operation_segments(package_name: str) -> set[str]:
    """Every `$name` path segment of every APIRouter in a backend's package."""
    package = importlib.import_module(package_name)
    found: set[str] = set()
    for module_info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if isinstance(value, APIRouter):
                for route in value.routes:
                    found |= set(re.findall(r"\$[a-z-]+", getattr(route, "path", "")))
    return found


def test_every_backend_operation_has_its_own_route_name() -> None:
    records, psychnotes = operation_segments("records"), operation_segments("psychnotes")
    assert {"$sign", "$entered-in-error", "$verify-signature", "$deny", "$status"} <= records
    assert {"$sign", "$attest", "$revoke", "$consent-token", "$revoke-consent-token"} <= psychnotes
    assert (records | psychnotes) - proxy.KNOWN_OPERATIONS == set()


def test_operation_route_names_are_named_and_bounded() -> None:
    assert proxy.route_name("/psychnotes/fhir", "DocumentReference/n1/$sign") == \
        "/psychnotes/fhir/{type}/{id}/$sign"
    assert proxy.route_name("/psychnotes/fhir", "Consent/c1/$attest") == \
        "/psychnotes/fhir/{type}/{id}/$attest"
    assert proxy.route_name("/fhir", "Task/t1/$deny") == "/fhir/{type}/{id}/$deny"
    invented = {proxy.route_name("/fhir", f"Patient/p/$made-up-{n}") for n in range(50)}
    assert invented == {"/fhir/{type}/{id}/{operation}"}

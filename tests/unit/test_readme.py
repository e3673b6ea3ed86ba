"""The README's configuration table lists every setting each service reads, so operators never
need the source to configure Mindchart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from mindchart_core.http_limits import HttpLimits
from psychnotes.settings import PsychnotesSettings
from records.cdex.settings import CdexSettings
from records.export.settings import ExportSettings
from records.settings import RecordsSettings
from records.subscriptions.settings import SubscriptionSettings
from workspace.settings import WorkspaceSettings

SETTINGS = [GatewaySettings, RecordsSettings, PsychnotesSettings, ExportSettings, SubscriptionSettings,
            CdexSettings, WorkspaceSettings, HttpLimits]
PREFIXES = sorted((s.model_config.get("env_prefix", "") for s in SETTINGS), key=len, reverse=True)
COMMON = {"env", "log_level", "data_dir"}  # MINDCHART_ENV etc., documented once


def documented_variables() -> set[str]:
    """First-column names of the README's configuration table; `A_X` / `_Y` names two variables."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names: set[str] = set()
    for row in re.findall(r"^\| (`[A-Z_]+`(?: / `_[A-Z_]+`)*) \|", readme, re.MULTILINE):
        full, *short = re.findall(r"`([A-Z_]+)`", row)
        names.add(full)
        prefix = next((p for p in PREFIXES if full.startswith(p)), "")
        names.update(prefix + s.lstrip("_") for s in short)
    return names


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.__name__)
def test_every_setting_is_in_the_readme_table(settings: type[BaseSettings]) -> None:
    prefix = settings.model_config.get("env_prefix", "")
    documented = documented_variables()
    missing = [f"{prefix}{name.upper()}" for name in settings.model_fields
               if name not in COMMON and f"{prefix}{name.upper()}" not in documented]
    assert not missing, f"README configuration table lacks: {missing}"

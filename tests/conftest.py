"""Shared fixtures: one real Mindchart stack per test session (embedded SecantusDB per datastore,
the three services as real uvicorn processes on free ports), spoken to over HTTP."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from mindchart_cli import stack
from tests.actors import BackendAuth, BackendClient, records_client, register_backend


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningStack:
    def __init__(self, runner: stack.Stack) -> None:
        self.runner = runner
        self.config = runner.config
        self.gateway_url = runner.config.gateway_url
        self.fhir = f"{self.gateway_url}/fhir"
        self.psychnotes = f"{self.gateway_url}/psychnotes/fhir"

    def direct_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.config.http_ports[service]}"

    @property
    def cli_env(self) -> dict[str, str]:
        env = {"MINDCHART_DATA_DIR": str(self.config.data_dir)}
        for name in stack.SERVICES:
            env[f"MINDCHART_{name.upper()}_MONGO_URL"] = self.config.mongo_url(name)
        return env

    def db(self, service: str) -> Any:
        client: MongoClient[dict[str, Any]] = MongoClient(self.config.mongo_url(service), tz_aware=True)
        return client[f"mindchart_{service}"]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.runner.log_dir.glob("*.log")))


@contextmanager
def whole_stack(data_dir: Path, mongo_urls: dict[str, str] | None = None,
                **extra_env: str) -> Iterator[RunningStack]:
    """A whole stack on free ports (embedded datastores in memory unless `mongo_urls` names
    others), its logs in files under `data_dir`, with `extra_env` for every service; stopped on exit."""
    runner = stack.Stack(stack.StackConfig(
        data_dir=data_dir,
        mongo_urls=mongo_urls or {},
        http_ports={name: free_port() for name in stack.SERVICES},
        db_ports={name: free_port() for name in stack.SERVICES},
        ephemeral=True,
        log_to_files=True,
        extra_env={"MINDCHART_LOG_LEVEL": "INFO", **extra_env},
    ))
    runner.start()
    try:
        yield RunningStack(runner)
    finally:
        runner.stop()


# The session stack's psychnotes remembers a care-team membership this long (30 s by default):
# a test that waits for a membership to lapse waits this long, not half a minute.
CARE_TEAM_CACHE_S = 2.0  # MINDCHART_PSYCHNOTES_CARE_TEAM_CACHE_SECONDS


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # MINDCHART_TEST_MONGO_URL runs the same suites against real MongoDB (tests/integration/
    # test_real_mongodb.py sets it to a MongoDB 8 container); each service keeps its own database.
    real_mongo = os.environ.get("MINDCHART_TEST_MONGO_URL")
    with whole_stack(tmp_path_factory.mktemp("mindchart-var"),
                     {name: real_mongo for name in stack.SERVICES} if real_mongo else None,
                     MINDCHART_PSYCHNOTES_CARE_TEAM_CACHE_SECONDS=str(CARE_TEAM_CACHE_S)) as running:
        yield running


@pytest.fixture(scope="session")
def writer(live: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> BackendClient:
    """A backend client allowed to read and write everything in records."""
    client = BackendClient("test-writer", live.gateway_url)
    register_backend(live.cli_env, client, "system/*.cruds", tmp=tmp_path_factory.mktemp("keys"))
    return client


@pytest.fixture(scope="module")
def fhir(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    """Records through the gateway as `writer`, every answer checked against the R4 schema."""
    with records_client(live, auth=BackendAuth(writer, "system/*.cruds")) as client:
        yield client


@pytest.fixture(scope="session")
def writer_http(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.fhir, timeout=30, auth=BackendAuth(writer, "system/*.cruds"), headers={
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
    }) as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Unit tests first; then everything on the shared stack; `test_zz_*` modules (which inspect
    # what the whole run left behind: logs, metrics) last.
    def order(item: pytest.Item) -> int:
        path = str(item.fspath)
        return 0 if "/unit/" in path else 2 if "/test_zz_" in path else 1

    items.sort(key=order)



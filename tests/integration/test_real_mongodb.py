"""The storage and consent suites against real MongoDB 8 (a single-node replica set, since
transactions need one), through testcontainers. Where no Docker engine runs, as on this project's
CI, the module is skipped with that reason: nothing here is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
SUITES = ["tests/e2e/test_skeleton.py", "tests/e2e/test_records*.py", "tests/e2e/test_psychnotes*.py"]


def docker_engine_problem() -> str | None:
    try:
        import docker  # testcontainers' own dependency

        docker.from_env().ping()
    except Exception as exc:  # the docker SDK raises many kinds; any means "no engine here"
        return f"no Docker engine is reachable ({type(exc).__name__}); real-MongoDB suites skipped"
    return None


@pytest.fixture(scope="module")
def mongodb8_url() -> Iterator[str]:
    problem = docker_engine_problem()
    if problem:
        pytest.skip(problem)
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = (DockerContainer("mongo:8.0")
                 .with_command("--replSet rs0 --bind_ip_all")
                 .with_exposed_ports(27017))
    with container:
        wait_for_logs(container, "Waiting for connections", timeout=120)
        initiate = "rs.initiate({_id:'rs0',members:[{_id:0,host:'localhost:27017'}]})"
        container.exec(["mongosh", "--quiet", "--eval", initiate])
        host, port = container.get_container_host_ip(), container.get_exposed_port(27017)
        url = f"mongodb://{host}:{port}/?directConnection=true"
        from pymongo import MongoClient

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until this node is primary (writes accepted)
            with MongoClient(url, serverSelectionTimeoutMS=1000) as client:
                if client.admin.command("hello").get("isWritablePrimary"):
                    break
            time.sleep(0.5)
        yield url


def test_storage_and_consent_suites_pass_on_mongodb8(mongodb8_url: str) -> None:
    suites = [str(p.relative_to(ROOT)) for pattern in SUITES for p in sorted(ROOT.glob(pattern))]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=ROOT, env={**os.environ, "MINDCHART_TEST_MONGO_URL": mongodb8_url},
        capture_output=True, text=True, timeout=1800, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

"""A throwaway embedded datastore (SecantusDB, in memory) per test module, for tests that speak
to records' store directly rather than through the whole stack."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from mindchart_cli import stack
from tests.conftest import free_port


@pytest.fixture(scope="module")
def mongo_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([stack.secantusd(), "--host", "127.0.0.1", "--port", str(port),
                                "--storage-path", ":memory:", "--log-level", "WARNING"])
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        stack.wait_for_mongo(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)

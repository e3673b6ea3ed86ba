"""The system under measurement: the real stack (an embedded SecantusDB per datastore, the three
services as uvicorn processes) on free loopback ports, a SMART backend client registered with the
real `mindchart` CLI, and the bare floor app beside it.

With MINDCHART_BENCH_MONGO_URL set, all three services use that MongoDB instead (databases named
`bench_<service>_<random>`, dropped at the end) and no embedded server is started.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient

from bench import machine
from mindchart_cli import seed, stack
from tests.actors import BackendClient, register_backend

CLIENT_ID = "bench-backend"
ALL_SCOPES = "system/*.cruds"
# records' custom scope that lets an export include R/V-labelled resources (every progress note)
EXPORT_RESTRICTED = "__export-restricted"
# The gateway's default budget (6000 requests a minute per client) would turn a load test into
# a rate-limiter test; the limiter still runs and counts every request.
EXTRA_ENV = {"MINDCHART_GATEWAY_RATE_LIMIT_REQUESTS": str(10**9), "MINDCHART_LOG_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchStack:
    def __init__(self, runner: stack.Stack, mongo_url: str | None, db_names: dict[str, str]) -> None:
        self.runner = runner
        self.config = runner.config
        self.mongo_url_override = mongo_url
        self.db_names = db_names
        self.gateway_url = self.config.gateway_url
        self.fhir = f"{self.gateway_url}/fhir"
        self.psychnotes_fhir = f"{self.gateway_url}/psychnotes/fhir"
        self.client = BackendClient(CLIENT_ID, self.gateway_url)

    # -- where things are ----------------------------------------------------------------------

    def direct_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.config.http_ports[service]}"

    def pid(self, service: str) -> int:
        return int(self.runner.processes[service].pid)

    def pids(self) -> dict[str, int]:
        """Every process of the stack: services and embedded datastores ("records-db")."""
        return {label.replace("datastore-", "") + ("-db" if label.startswith("datastore-") else ""):
                int(process.pid) for label, process in self.runner.processes.items()}

    def datastores(self, *services: str) -> dict[str, str]:
        return {f"{name}-db": self.mongo_url(name) for name in services}

    def mongo_url(self, service: str) -> str:
        return str(self.config.mongo_url(service))

    def db_name(self, service: str) -> str:
        return self.db_names.get(service, f"mindchart_{service}")

    def datastore_info(self) -> dict[str, Any]:
        return machine.datastore(self.mongo_url("records"), embedded=self.mongo_url_override is None)

    @property
    def cli_env(self) -> dict[str, str]:
        env = {"MINDCHART_DATA_DIR": str(self.config.data_dir)}
        for name in stack.SERVICES:
            env[f"MINDCHART_{name.upper()}_MONGO_URL"] = self.config.mongo_url(name)
            if name in self.db_names:
                env[f"MINDCHART_{name.upper()}_DB_NAME"] = self.db_names[name]
        return env

    # -- credentials ---------------------------------------------------------------------------

    def register(self) -> None:
        folder = self.config.data_dir / "keys"
        folder.mkdir(parents=True, exist_ok=True)
        register_backend(self.cli_env, self.client, f"{ALL_SCOPES} {EXPORT_RESTRICTED}",
                         audiences=("records", "psychnotes"), tmp=folder)

    def token(self, scope: str = ALL_SCOPES, audience: str | None = None) -> str:
        """A fresh backend-services access token (5 minutes): fetch one per measurement phase."""
        extra = {"aud": audience} if audience else {}
        return self.client.token(scope, **extra)

    def user_token(self, *, audience: str, fhir_user: str, scope: str, **claims: Any) -> str:
        """An access token for a signed-in user, signed with the gateway's current key (what the
        SMART launch would issue; the launch itself is not what is measured here)."""
        from joserfc import jwt
        from joserfc.jwk import RSAKey

        mongo: MongoClient[dict[str, Any]]
        with MongoClient(self.mongo_url("gateway"), tz_aware=True) as mongo:
            doc = mongo[self.db_name("gateway")].signing_keys.find_one(sort=[("created", -1)])
        if doc is None:
            raise RuntimeError("the gateway has no signing key yet")
        from gateway import keys
        from mindchart_core import keyfiles

        kek = keyfiles.read_kek(self.config.data_dir / "keys" / keys.DEV_KEK_NAME)
        key = RSAKey.import_key(keys.open_private_jwk(kek, doc))  # sealed under the gateway's KEK
        now = int(time.time())
        body = {"iss": self.gateway_url, "aud": audience, "sub": "bench-user", "client_id": CLIENT_ID,
                "scope": scope, "fhirUser": f"{self.gateway_url}/fhir/{fhir_user}", "iat": now,
                "exp": now + 3600, "jti": secrets.token_hex(16), **claims}
        return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, body, key)

    def seed_demo(self) -> None:
        """The demo patient, therapist, sessions, notes and scores (PUT, as `make run` seeds)."""
        headers = {"Authorization": f"Bearer {self.token()}", "Content-Type": "application/fhir+json"}
        with httpx.Client(base_url=self.fhir, headers=headers, timeout=60, trust_env=False) as http:
            for resource in seed.demo_resources():
                response = http.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"seeding {resource['resourceType']}/{resource['id']} answered "
                                       f"{response.status_code}: {response.text[:300]}")

    # -- the floor -------------------------------------------------------------------------------

    @contextmanager
    def floor(self) -> Iterator[tuple[str, int]]:
        """bench/floor_app.py on a free port against the records datastore: (url, pid)."""
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(machine.REPO),
               "BENCH_FLOOR_MONGO_URL": self.mongo_url("records"),
               "BENCH_FLOOR_DB_NAME": self.db_name("records")}
        log = open(self.config.data_dir / "floor.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "bench.floor_app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
            cwd=machine.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the floor app exited with {process.returncode}; see {log.name}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the floor app did not start within 60 s")
                time.sleep(0.2)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@contextmanager
def running_stack() -> Iterator[BenchStack]:
    mongo_url = os.environ.get("MINDCHART_BENCH_MONGO_URL") or None
    with tempfile.TemporaryDirectory(prefix="mindchart-bench-") as tmp:
        db_names: dict[str, str] = {}
        extra_env = dict(EXTRA_ENV)
        if mongo_url:
            suffix = secrets.token_hex(4)
            db_names = {name: f"bench_{name}_{suffix}" for name in stack.SERVICES}
            extra_env.update({f"MINDCHART_{n.upper()}_DB_NAME": db for n, db in db_names.items()})
        config = stack.StackConfig(
            data_dir=Path(tmp),
            http_ports={name: free_port() for name in stack.SERVICES},
            db_ports={name: free_port() for name in stack.SERVICES},
            mongo_urls={name: mongo_url for name in stack.SERVICES} if mongo_url else {},
            ephemeral=False,  # on disk under the temporary directory: 100k notes overflow an in-memory cache
            log_to_files=True,
            extra_env=extra_env,
        )
        runner = stack.Stack(config)
        runner.start()
        bench_stack = BenchStack(runner, mongo_url, db_names)
        try:
            bench_stack.register()
            bench_stack.seed_demo()
            yield bench_stack
        finally:
            runner.stop()
            if mongo_url:
                cleanup: MongoClient[dict[str, Any]]
                with MongoClient(mongo_url) as cleanup:
                    for db in db_names.values():
                        cleanup.drop_database(db)

"""The whole stack on one machine: an embedded SecantusDB per datastore, then the three services,
then the therapists' workspace app (registered at the gateway as a confidential client first).

Used by `mindchart run` (the README's `make run`) and by the end-to-end tests. A datastore whose
MongoDB URL is set in the environment (MINDCHART_<SERVICE>_MONGO_URL) is used as is, and no
embedded server is started for it. Embedded datastores on disk fsync every commit
(--sync-on-commit), so what they acknowledged survives a kill. Children run in their own process
groups and are stopped together on exit, Ctrl-C or SIGTERM; supervisor.py restarts one that dies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient
from pymongo.errors import PyMongoError

SERVICES = ("records", "psychnotes", "gateway", "workspace")
DEFAULT_DB_PORTS = {"records": 27117, "psychnotes": 27118, "gateway": 27119, "workspace": 27120}
DEFAULT_HTTP_PORTS = {"gateway": 8000, "records": 8001, "psychnotes": 8002, "workspace": 8003}
# uvicorn's httptools protocol with header size/count limits and a head deadline (every service).
HTTP_PROTOCOL = "mindchart_core.http_limits:LimitedHttpToolsProtocol"


def service_argv(name: str, host: str, port: int) -> list[str]:
    """The command line of a service process (the stack's, and a test's extra replica)."""
    return [
        sys.executable, "-m", "uvicorn", "--factory", f"{name}.app:create_app",
        "--host", host, "--port", str(port), "--no-access-log", "--log-level", "warning",
        "--no-proxy-headers",  # the gateway trusts forwarded headers itself (forwarded.py)
        "--http", HTTP_PROTOCOL,  # header limits and head deadline (mindchart_core.http_limits)
    ]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the runner dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class StackError(RuntimeError):
    """The stack could not start; the message says which part and where its log is."""


def _run_to_completion(job: Coroutine[Any, Any, None]) -> None:
    """Run `job` to its end from synchronous code: on a thread of its own when the caller is
    itself inside an event loop (the bench starts the stack from its async main), since
    asyncio.run refuses to nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(job)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, job).result()


def data_dir_from_env() -> Path:
    return Path(os.environ.get("MINDCHART_DATA_DIR", "var")).resolve()


def secantusd() -> str:
    candidate = Path(sys.executable).parent / "secantusd-py"
    found = str(candidate) if candidate.exists() else shutil.which("secantusd-py")
    if not found:
        raise StackError("SecantusDB is not installed: run `make run` (it installs the dev group)")
    return found


def wait_for_mongo(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"the datastore at {url} exited with code {process.returncode}")
        if mongo_answers(url):
            return
        time.sleep(0.2)
    raise StackError(f"the datastore at {url} did not answer within {timeout:.0f}s")


def mongo_answers(url: str) -> bool:
    try:
        with MongoClient(url, serverSelectionTimeoutMS=300) as client:
            client.admin.command("ping")
        return True
    except PyMongoError:
        return False


@dataclass
class StackConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    http_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HTTP_PORTS))
    db_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DB_PORTS))
    mongo_urls: dict[str, str] = field(default_factory=dict)  # configured, not embedded
    ephemeral: bool = False  # tests: embedded data in memory, gone on stop
    # Fsync the datastore's log on every commit (SecantusDB --sync-on-commit): without it a killed
    # datastore loses transactions it had acknowledged. Meaningless for in-memory data.
    durable: bool = True
    log_to_files: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    public_url: str | None = None  # MINDCHART_GATEWAY_PUBLIC_URL; else derived from host and port

    @classmethod
    def from_env(cls) -> StackConfig:
        urls = {
            name: url for name in SERVICES
            if (url := os.environ.get(f"MINDCHART_{name.upper()}_MONGO_URL"))
        }
        config = cls(data_dir=data_dir_from_env(), mongo_urls=urls,
                     public_url=os.environ.get("MINDCHART_GATEWAY_PUBLIC_URL") or None)
        for name in SERVICES:
            port = os.environ.get(f"MINDCHART_{name.upper()}_PORT")
            if port:
                config.http_ports[name] = int(port)
            db_port = os.environ.get(f"MINDCHART_{name.upper()}_DB_PORT")
            if db_port:
                config.db_ports[name] = int(db_port)
        return config

    @property
    def gateway_url(self) -> str:
        """Where this machine reaches the gateway (seeding, health checks, JWKS)."""
        return f"http://{self.host}:{self.http_ports['gateway']}"

    @property
    def public_gateway_url(self) -> str:
        """The one rule for the gateway's public URL (issuer, FHIR bases, `iss` of launches),
        shared by `make run` and every CLI command: MINDCHART_GATEWAY_PUBLIC_URL when set, else
        the gateway's own address with MINDCHART_GATEWAY_PORT."""
        return (self.public_url or self.gateway_url).rstrip("/")

    @property
    def workspace_url(self) -> str:
        return f"http://{self.host}:{self.http_ports['workspace']}"

    def mongo_url(self, name: str) -> str:
        return self.mongo_urls.get(name) or (
            f"mongodb://{self.host}:{self.db_ports[name]}/?directConnection=true"
        )

    def service_env(self, name: str) -> dict[str, str]:
        gw = self.public_gateway_url
        prefix = f"MINDCHART_{name.upper()}_"
        env = {
            f"{prefix}HOST": self.host,
            f"{prefix}PORT": str(self.http_ports[name]),
            f"{prefix}MONGO_URL": self.mongo_url(name),
            "MINDCHART_DATA_DIR": str(self.data_dir),
        }
        if name == "workspace":
            from mindchart_cli import workspace_client

            env.update({
                f"{prefix}PUBLIC_URL": self.workspace_url,
                f"{prefix}GATEWAY_URL": gw,
                f"{prefix}CLIENT_ID": workspace_client.CLIENT_ID,
                f"{prefix}CLIENT_SECRET_FILE": str(workspace_client.secret_file(self.data_dir)),
            })
        elif name == "gateway":
            env.update({
                f"{prefix}PUBLIC_URL": gw,
                f"{prefix}RECORDS_URL": f"http://{self.host}:{self.http_ports['records']}",
                f"{prefix}PSYCHNOTES_URL": f"http://{self.host}:{self.http_ports['psychnotes']}",
            })
        else:
            base = f"{gw}/fhir" if name == "records" else f"{gw}/psychnotes/fhir"
            env.update({
                f"{prefix}PUBLIC_BASE_URL": base,
                f"{prefix}ISSUER": gw,
                f"{prefix}JWKS_URL": f"{self.gateway_url}/oauth/jwks",
                f"{prefix}REVOCATIONS_URL": f"{self.gateway_url}/oauth/revocations",
            })
        if name == "psychnotes":  # it asks records (through the gateway) who treats whom
            env.update({f"{prefix}TOKEN_URL": f"{self.gateway_url}/oauth/token",
                        f"{prefix}RECORDS_BASE_URL": f"{self.gateway_url}/fhir"})
        return env


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = config.data_dir / "logs"
        self._argv: dict[str, list[str]] = {}  # how each datastore was started, to restart it

    def _spawn(self, label: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = None
        if self.config.log_to_files or label.startswith("datastore"):
            out = open(self.log_dir / f"{label}.log", "ab")  # the child process owns this handle
        process = subprocess.Popen(  # noqa: S603 - our own executables, fixed arguments
            # Unbuffered: a log line is in the file as soon as it is written (tests read the logs).
            argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.config.extra_env, **env},
            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
            preexec_fn=_die_with_parent,  # no threads run at spawn time, so preexec_fn is safe
        )
        self.processes[label] = process
        return process

    def start_datastores(self) -> None:
        for name in SERVICES:
            if name in self.config.mongo_urls:
                continue
            url = self.config.mongo_url(name)
            if mongo_answers(url):
                raise StackError(f"port {self.config.db_ports[name]} is already in use "
                                 f"(another `make run`?)")
            storage = ":memory:" if self.config.ephemeral else str(self.config.data_dir / "db" / name)
            if not self.config.ephemeral:
                Path(storage).mkdir(parents=True, exist_ok=True)
            process = self._spawn(f"datastore-{name}", self._datastore_argv(name, storage), {})
            wait_for_mongo(url, 60, process)

    def _datastore_argv(self, name: str, storage: str) -> list[str]:
        argv = [secantusd(), "--host", self.config.host, "--port", str(self.config.db_ports[name]),
                "--storage-path", storage, "--log-level", "WARNING", "--cache-size", "256M"]
        if self.config.durable and not self.config.ephemeral:
            argv.append("--sync-on-commit")
        self._argv[f"datastore-{name}"] = argv
        return argv

    def _spawn_service(self, name: str) -> None:
        self._spawn(name, service_argv(name, self.config.host, self.config.http_ports[name]),
                    self.config.service_env(name))

    def start_services(self) -> None:
        for name in ("gateway", "records", "psychnotes"):
            self._spawn_service(name)
        for name in ("gateway", "records", "psychnotes"):
            self._wait_http(name, f"http://{self.config.host}:{self.config.http_ports[name]}/readyz")
        self.register_workspace()
        self._spawn_service("workspace")
        self._wait_http("workspace", f"{self.config.workspace_url}/readyz")

    def register_workspace(self) -> None:
        """The workspace is a client like any other: registered in the gateway's datastore."""
        from pymongo import AsyncMongoClient

        from gateway.settings import GatewaySettings
        from mindchart_cli import workspace_client

        secret = workspace_client.load_or_make_secret(self.config.data_dir).read_text().strip()

        async def register() -> None:
            client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
                self.config.mongo_url("gateway"), tz_aware=True)
            try:
                db_name = self.config.extra_env.get("MINDCHART_GATEWAY_DB_NAME") or GatewaySettings().db_name
                await workspace_client.register(client[db_name], self.config.workspace_url,
                                                secret)
            finally:
                await client.close()

        _run_to_completion(register())

    def _wait_http(self, name: str, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise StackError(f"{name} exited with code {process.returncode}"
                                 f" (see {self.log_dir / (name + '.log')})")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(f"{name} did not become ready within {timeout:.0f}s")

    def register_service_clients(self) -> None:
        """psychnotes' own backend client at the gateway (it asks records for care teams): its
        development key is made under the data dir, and its public half registered with scope
        system/CareTeam.rs. In production an administrator registers it (README)."""
        from pymongo import AsyncMongoClient

        from gateway import admin
        from gateway.settings import GatewaySettings
        from psychnotes import careteam, keys
        from psychnotes.settings import PsychnotesSettings

        settings = PsychnotesSettings(data_dir=str(self.config.data_dir))
        if settings.records_client_key_file is not None:
            return  # configured from outside: registered from outside too
        key = keys.load_records_client_key(settings)

        async def register() -> None:
            client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
                self.config.mongo_url("gateway"), tz_aware=True)
            try:
                await admin.create_client(
                    client[GatewaySettings().db_name], client_id=settings.records_client_id,
                    auth="private_key_jwt", scope=careteam.SCOPE, audiences=["records"],
                    jwks={"keys": [key.as_dict(private=False)]}, name="Mindchart psychnotes")
            finally:
                await client.close()

        _run_to_completion(register())

    def start(self) -> None:
        try:
            self.start_datastores()
            self.register_service_clients()
            self.start_services()
        except BaseException:
            self.stop()
            raise

    def stop(self, only: tuple[str, ...] | None = None) -> None:
        if only is None:  # a second Ctrl-C or SIGTERM must not interrupt the shutdown itself
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(sig, signal.SIG_IGN)
        labels = [k for k in reversed(list(self.processes)) if only is None or k in only]
        for label in labels:
            process = self.processes[label]
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for label in labels:
            process = self.processes.pop(label)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def kill(self, label: str) -> None:
        """Hard-kill one child (crash tests)."""
        process = self.processes.pop(label)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def respawn(self, label: str) -> None:
        """Start one child again as it was started, without waiting for it (the supervisor)."""
        if label.startswith("datastore-"):
            self._spawn(label, self._argv[label], {})
        else:
            self._spawn_service(label)

    def restart_service(self, name: str) -> None:
        self._spawn_service(name)
        self._wait_http(name, f"http://{self.config.host}:{self.config.http_ports[name]}/readyz")

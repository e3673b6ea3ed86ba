"""The deployment files keep Mindchart's isolation rules (issue 7).

Reads deploy/Dockerfile, docker-compose.yml and every YAML document under deploy/k8s with PyYAML
and the standard library only (this CI has no Docker engine), and fails when a change would let
records reach psychnotes' database, publish a port other than the gateway's, run as root, drop a
probe, or commit a secret. Where `kubectl` or `kustomize` is on PATH the kustomize base is also
rendered and the same Kubernetes checks run on the rendered output.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"

# The contract: each service's package, port and public path (DESIGN.md, "Public surface").
PORTS = {"gateway": 8000, "records": 8001, "psychnotes": 8002}
SERVICES = tuple(PORTS)
BACKENDS = ("records", "psychnotes")
MONGO_PORT = 27017

# How the k8s NetworkPolicies name the external MongoDB pods (deploy/README.md).
DATASTORE_NAMESPACE = "mindchart-data"
DATASTORE_LABEL = "mindchart.io/datastore"
POD_NAME_LABEL = "app.kubernetes.io/name"

COMPILER_PACKAGES = {
    "gcc",
    "g++",
    "cc",
    "c++",
    "clang",
    "build-essential",
    "make",
    "cmake",
    "gfortran",
    "rustc",
    "cargo",
    "libc6-dev",
    "musl-dev",
    "python3-dev",
    "python-dev",
    "linux-headers",
}


# ----------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str  # as written after FROM, before ARG substitution
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue  # Docker drops comment lines, even inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending or line:
            logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def image_chain(service: str) -> tuple[str, list[Stage]]:
    """The external base image and the stages, base first, that `--build-arg SERVICE=service`
    produces (the last stage is the default target)."""
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    variables = {**global_args, "SERVICE": service}
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while (base := substitute(chain[0].base, variables).lower()) in by_name:
        chain.insert(0, by_name[base])
    return base, chain


def instructions(chain: list[Stage], keyword: str) -> list[str]:
    return [args for stage in chain for kw, args in stage.instructions if kw == keyword]


def env_of(chain: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(chain, "ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    if args.startswith("["):
        return list(json.loads(args))
    return ["/bin/sh", "-c", args]


@pytest.mark.parametrize("service", SERVICES)
def test_image_is_the_service_stage_on_python_slim(service: str) -> None:
    base, chain = image_chain(service)
    names = [stage.name for stage in chain]
    assert service in names, f"SERVICE={service} does not select the {service} stage: {names}"
    assert "builder" not in names, "the final image must not be built on the builder stage"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]+)?", base), base


@pytest.mark.parametrize("service", SERVICES)
def test_image_runs_as_a_numeric_non_root_user(service: str) -> None:
    _, chain = image_chain(service)
    users = instructions(chain, "USER")
    assert users, "the final stage has no USER, so it runs as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), f"USER {users[-1]!r}: use a numeric uid so runAsNonRoot can verify it"
    assert int(user) != 0, "USER is root"
    assert not group or (group.isdigit() and int(group) != 0), f"group of USER {users[-1]!r}"


@pytest.mark.parametrize("service", SERVICES)
def test_image_healthcheck_probes_healthz_with_urllib(service: str) -> None:
    _, chain = image_chain(service)
    checks = instructions(chain, "HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    assert checks[-1].upper() != "NONE"
    command = " ".join(exec_form(checks[-1].split("CMD", 1)[1].strip()))
    assert "python" in command and "urllib" in command, command
    if "HEALTHCHECK_URL" in command:  # the URL comes from the service stage's ENV
        command += " " + env_of(chain).get("HEALTHCHECK_URL", "")
    port = PORTS[service]
    assert re.search(rf"http://(127\.0\.0\.1|localhost):{port}/healthz\b", command), (
        f"the health check does not probe this service's /healthz: {command!r}"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_image_command_is_the_uvicorn_factory(service: str) -> None:
    _, chain = image_chain(service)
    port = str(PORTS[service])
    assert exec_form(instructions(chain, "CMD")[-1]) == [
        "uvicorn",
        "--factory",
        f"{service}.app:create_app",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--http",  # header size/count limits and head deadline (mindchart_core/http_limits.py)
        "mindchart_core.http_limits:LimitedHttpToolsProtocol",
    ]
    assert port in instructions(chain, "EXPOSE")[-1].split()


@pytest.mark.parametrize("service", SERVICES)
def test_image_has_no_compilers_no_secantusdb_no_sources(service: str) -> None:
    _, chain = image_chain(service)
    for stage in chain:
        for keyword, args in stage.instructions:
            line = f"{stage.name}: {keyword} {args}"
            assert "secantus" not in args.lower(), line
            if keyword == "RUN":
                words = set(re.split(r"[\s;&|]+", args))
                assert not words & COMPILER_PACKAGES, f"compiler in the runtime image: {line}"
                assert not re.search(r"\b(apt-get|apt|apk|dnf|yum)\b.*\binstall\b", args), line
                assert not re.search(r"\b(pip|uv)\b", args), f"installs at runtime: {line}"
            if keyword in ("COPY", "ADD"):
                # Only the finished virtualenv comes in, from the builder: no source tree, no uv.
                words = args.split()
                flags = [w for w in words if w.startswith("--")]
                sources = [w for w in words if not w.startswith("--")][:-1]
                assert "--from=builder" in flags, line
                assert sources and all(src.startswith("/app/.venv") for src in sources), line


def test_builder_installs_production_dependencies_only() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    builder = next(s for s in stages if s.name == "builder")
    syncs = [args for kw, args in builder.instructions if kw == "RUN" and "uv sync" in args]
    assert syncs, "the builder never runs uv sync"
    for args in syncs:
        options = args[args.index("uv sync") :].split()
        for required in ("--frozen", "--no-dev", "--package"):
            assert required in options, f"uv sync without {required}: {args}"
        assert options[options.index("--package") + 1].strip('"') in ("$SERVICE", "${SERVICE}")
        for forbidden in ("--dev", "--all-groups", "--group", "--all-extras", "--all-packages"):
            assert forbidden not in options, f"uv sync {forbidden} pulls in dev tools: {args}"
    assert not any("pip install" in args for _, args in builder.instructions)


def _lock_closure(packages: dict[str, dict[str, Any]], root: str) -> set[str]:
    """Names of everything `root` needs at run time: its dependencies and their requested
    extras, transitively; dev-dependencies (groups) are not followed."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        name, extras = item
        package = packages.get(name, {})
        deps = list(package.get("dependencies", []))
        for extra in extras:
            deps += package.get("optional-dependencies", {}).get(extra, [])
        todo += [(d["name"], tuple(sorted(d.get("extra", ())))) for d in deps]
    return {name for name, _ in seen}


@pytest.mark.parametrize("service", SERVICES)
def test_lockfile_keeps_dev_tools_out_of_the_service(service: str) -> None:
    """What `uv sync --no-dev --package <service>` installs, computed from uv.lock."""
    lock_path = REPO / "uv.lock"
    if not lock_path.exists():
        pytest.skip("no uv.lock yet")
    packages = {p["name"]: p for p in tomllib.loads(lock_path.read_text())["package"]}
    if service not in packages:
        pytest.skip(f"{service} is not in uv.lock yet")
    closure = _lock_closure(packages, service)
    for dev_only in ("secantusdb", "pytest", "testcontainers", "ruff", "mypy"):
        assert dev_only not in closure, f"{dev_only} is a runtime dependency of {service}"


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` do not."""
    regex = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token)
        )
    return re.compile(regex)


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, and a pattern that
    matches a directory covers everything under it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_pattern(pattern.removeprefix("!"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_build_context_leaves_out_secrets_and_local_state() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for path in (
        "deploy/secrets/records-mongo-url",
        "deploy/secrets/psychnotes-kek",
        ".git/config",
        ".venv/bin/python",
        "var/records/WiredTiger",
        "services/records/.venv/lib/site.py",
        "services/records/src/records/__pycache__/app.cpython-311.pyc",
    ):
        assert _dockerignore_excludes(patterns, path), f"{path} would enter the build context"
    for path in (
        "pyproject.toml",
        "uv.lock",
        "libs/core/pyproject.toml",
        "services/psychnotes/src/psychnotes/app.py",
        "cli/pyproject.toml",
    ):
        assert not _dockerignore_excludes(patterns, path), f"the build needs {path}"


# ----------------------------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<` merge keys


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults (no variables set)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def networks_of(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks")
    if networks is None:
        return {"default"}
    return set(networks)


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def secrets_of(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def owner_of(compose_service: str) -> str:
    """Which Mindchart service a compose service belongs to (mongo-records-init -> records)."""
    owners = [s for s in SERVICES if s in compose_service.split("-")]
    assert len(owners) == 1, f"cannot tell which service {compose_service} belongs to"
    return owners[0]


def test_compose_runs_each_service_with_its_own_mongodb(compose: dict[str, Any]) -> None:
    expected = set(SERVICES)
    expected |= {f"mongo-{s}" for s in SERVICES} | {f"mongo-{s}-init" for s in SERVICES}
    assert set(compose["services"]) == expected


def test_only_the_gateway_publishes_a_port(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("network_mode") is None, f"{name} uses network_mode"
        if name == "gateway":
            published = [interpolate(str(p)) for p in service["ports"]]
            assert published and all(p.endswith(":8000") for p in published), published
        else:
            assert not service.get("ports"), f"{name} publishes {service['ports']}"


def test_every_container_names_its_networks(compose: dict[str, Any]) -> None:
    # Without `networks:` a container joins `default`, which every other such container shares.
    for name, service in compose["services"].items():
        assert "networks" in service, f"{name} would join the shared default network"
        assert networks_of(service) <= set(compose["networks"]), name


def test_psychnotes_database_shares_no_network_with_records(compose: dict[str, Any]) -> None:
    services = compose["services"]
    records = networks_of(services["records"])
    for name in ("mongo-psychnotes", "mongo-psychnotes-init"):
        shared = networks_of(services[name]) & records
        assert not shared, f"records can reach {name} over {shared}"
    shared = networks_of(services["psychnotes"]) & records
    assert not shared, f"records and psychnotes share {shared}"


@pytest.mark.parametrize("owner", SERVICES)
def test_each_database_network_holds_only_its_owner(compose: dict[str, Any], owner: str) -> None:
    services = compose["services"]
    for network in networks_of(services[f"mongo-{owner}"]):
        members = {name for name, s in services.items() if network in networks_of(s)}
        assert members == {owner, f"mongo-{owner}", f"mongo-{owner}-init"}, (network, members)
        assert compose["networks"][network].get("internal") is True, f"{network} not internal"


def test_only_the_gateway_is_on_a_routable_network(compose: dict[str, Any]) -> None:
    for network, spec in compose["networks"].items():
        if (spec or {}).get("internal") is True:
            continue
        members = {n for n, s in compose["services"].items() if network in networks_of(s)}
        assert members == {"gateway"}, f"{network} is not internal and holds {members}"


def test_each_container_gets_only_its_own_secrets(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        owner = owner_of(name)
        for secret in secrets_of(service):
            assert owner_of(secret) == owner, f"{name} is given {secret}"
    psychnotes_only = {"psychnotes-kek", "psychnotes-signing-key.pem",
                       "psychnotes-document-signing-key.pem", "psychnotes-mongo-url"}
    holders = {n for n, s in compose["services"].items() if secrets_of(s) & psychnotes_only}
    assert holders == {"psychnotes"}, holders


def test_secret_files_are_generated_and_git_ignored(compose: dict[str, Any]) -> None:
    for name, spec in compose["secrets"].items():
        assert set(spec) == {"file"}, f"secret {name} must come from a file"
        assert spec["file"] == f"./deploy/secrets/{name}", spec
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "secrets/" in ignored or "/secrets/" in ignored
    if shutil.which("git") and (REPO / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "deploy/secrets"], cwd=REPO, capture_output=True, text=True
        ).stdout.split()
        assert not tracked, f"secrets committed: {tracked}"


def test_services_read_credentials_from_secret_files(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        service = compose["services"][name]
        env = environment_of(service)
        assert env["MINDCHART_ENV"] == "production"
        prefix = f"MINDCHART_{name.upper()}_"
        assert f"{prefix}MONGO_URL" not in env, "a MongoDB URL with a password in plain env"
        assert f"{prefix}MONGO_URL_FILE" in env
        for key, value in env.items():
            assert "mongodb://" not in value and "PRIVATE KEY" not in value, key
            if key.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value.startswith("/run/secrets/") and secret in secrets_of(service), key
            if key.endswith("_FILES"):  # comma-separated, e.g. previous KEKs while one rotates
                for path in filter(None, (p.strip() for p in value.split(","))):
                    assert path.removeprefix("/run/secrets/") in secrets_of(service), key
        # Every key file the service refuses to start in production without is given to it.
        for required in production_key_files(name):
            assert required in env, f"{name} would refuse to start: {required} is not set"


def production_key_files(service: str) -> set[str]:
    """The `MINDCHART_*_FILE` settings a service's production check names when they are unset."""
    import importlib

    module = importlib.import_module(f"{service}.settings")
    settings_class = getattr(module, f"{service.capitalize()}Settings")
    bare = settings_class(env="production", mongo_url="mongodb://u:Q8v!x2LmP0rT9zK@db:27017/")
    return set(re.findall(r"MINDCHART_[A-Z_]+_FILE", "; ".join(bare.production_problems())))


def test_issuer_and_audiences_agree(compose: dict[str, Any]) -> None:
    env = {name: environment_of(compose["services"][name]) for name in SERVICES}
    check_issuer_and_audiences(env)


def check_issuer_and_audiences(env: dict[str, dict[str, str]]) -> None:
    """Tokens minted by the gateway verify at the backends: same issuer, the backend's own public
    base as audience, JWKS and backend URLs pointing at the right service and port."""
    public = env["gateway"]["MINDCHART_GATEWAY_PUBLIC_URL"]
    assert public.startswith(("http://", "https://")) and not public.endswith("/"), public
    for backend, path in (("records", "/fhir"), ("psychnotes", "/psychnotes/fhir")):
        prefix = f"MINDCHART_{backend.upper()}_"
        assert env[backend][f"{prefix}ISSUER"] == public
        assert env[backend][f"{prefix}PUBLIC_BASE_URL"] == public + path
        assert env[backend][f"{prefix}JWKS_URL"] == "http://gateway:8000/oauth/jwks"
        assert env[backend][f"{prefix}DB_NAME"] == f"mindchart_{backend}"
        upstream = env["gateway"][f"MINDCHART_GATEWAY_{backend.upper()}_URL"]
        assert upstream == f"http://{backend}:{PORTS[backend]}", upstream


@pytest.mark.parametrize("name", SERVICES)
def test_service_containers_are_built_here_and_hardened(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert service["build"]["args"]["SERVICE"] == name
    assert service.get("read_only") is True
    assert "ALL" in service.get("cap_drop", [])
    assert not service.get("privileged")
    assert "user" not in service, "the image's non-root USER must not be overridden"
    depends = service["depends_on"]
    assert depends[f"mongo-{name}"]["condition"] == "service_healthy"
    assert depends[f"mongo-{name}-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("owner", SERVICES)
def test_mongodb_is_a_replica_set_with_its_own_credentials(
    compose: dict[str, Any], owner: str
) -> None:
    mongo = compose["services"][f"mongo-{owner}"]
    assert re.fullmatch(r"mongo:8(\.\d+)*", mongo["image"]), mongo["image"]
    command = mongo["command"]
    assert "--replSet" in command and "--keyFile" in command, command
    assert mongo["healthcheck"]["test"], "no healthcheck"
    env = environment_of(mongo)
    assert env["MONGO_INITDB_ROOT_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "MONGO_INITDB_ROOT_PASSWORD" not in env
    init = compose["services"][f"mongo-{owner}-init"]
    assert "/mindchart-mongo/init-replica-set.sh" in init["entrypoint"]
    assert "./deploy/mongo:/mindchart-mongo:ro" in init["volumes"]
    init_env = environment_of(init)
    assert init_env["APP_USER"] == owner and init_env["APP_DB"] == f"mindchart_{owner}"
    assert init_env["MONGO_HOST"] == f"mongo-{owner}:{MONGO_PORT}"
    for script in ("init-replica-set.sh", "init-replica-set.js", "entrypoint.sh"):
        assert (DEPLOY / "mongo" / script).is_file(), script


@pytest.mark.skipif(not shutil.which("openssl"), reason="make-secrets.sh needs openssl")
def test_make_secrets_writes_every_secret_compose_reads(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    script = tmp_path / "deploy" / "make-secrets.sh"
    script.parent.mkdir()
    shutil.copy(DEPLOY / "make-secrets.sh", script)
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    out = script.parent / "secrets"
    assert {p.name for p in out.iterdir()} == set(compose["secrets"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for owner in SERVICES:
        password = (out / f"{owner}-mongo-password").read_text().strip()
        url = (out / f"{owner}-mongo-url").read_text().strip()
        assert url.startswith(f"mongodb://{owner}:{password}@mongo-{owner}:{MONGO_PORT}/")
        assert f"authSource=mindchart_{owner}" in url and "replicaSet=rs0" in url
    for kek in ("psychnotes-kek", "gateway-signing-kek"):
        assert len(base64.b64decode((out / kek).read_text())) == 32
    for key in ("gateway-signing-key.pem", "psychnotes-signing-key.pem",
                "psychnotes-document-signing-key.pem"):
        assert (out / key).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}, "a re-run changed secrets"


# ----------------------------------------------------------------------------------------------
# deploy/k8s (kustomize base)
# ----------------------------------------------------------------------------------------------


def load_k8s_sources() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.y*ml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"].setdefault("namespace", namespace)
    # configMapGenerator entries, as the ConfigMaps kustomize would emit (without the hash).
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(item.split("=", 1) for item in generator.get("literals", []))
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "namespace": namespace},
                "data": data,
            }
        )
    return kustomization, docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace + labels) or an address range off-cluster."""

    namespace: str | None = None
    pod_labels: tuple[tuple[str, str], ...] = ()
    cidr: str | None = None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod_labels)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def pod(namespace: str, **labels: str) -> Endpoint:
    return Endpoint(namespace=namespace, pod_labels=tuple(sorted(labels.items())))


# Address ranges a cluster may give pods: an ipBlock overlapping them may let a pod through.
POD_RANGES = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fd00::/8")
]


def _ip_block_covers(block: dict[str, Any], endpoint: Endpoint) -> bool:
    network = ipaddress.ip_network(block["cidr"], strict=False)
    targets = [ipaddress.ip_network(endpoint.cidr)] if endpoint.cidr else POD_RANGES
    for target in targets:
        if target.version != network.version or not network.overlaps(target):
            continue
        excepted = [ipaddress.ip_network(e, strict=False) for e in block.get("except", [])]
        if not any(target.version == e.version and target.subnet_of(e) for e in excepted):
            return True
    return False


def peer_selects(peer: dict[str, Any], policy_namespace: str, endpoint: Endpoint) -> bool:
    if "ipBlock" in peer:
        return _ip_block_covers(peer["ipBlock"], endpoint)
    if endpoint.cidr:
        return False  # selectors pick pods, never off-cluster addresses
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], endpoint.namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), endpoint.labels)


def ports_admit(ports: list[dict[str, Any]] | None, port: int, protocol: str = "TCP") -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        number = entry.get("port")
        if number is None or isinstance(number, str):
            return True  # all ports, or a named port we cannot resolve: assume the worst
        if number <= port <= entry.get("endPort", number):
            return True
    return False


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def flow_allowed(
    policies: list[dict[str, Any]],
    source: Endpoint,
    target: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether NetworkPolicies let `source` open a connection to `target` on `port`: both the
    source's egress and the target's ingress must allow it (either side is open when no policy
    selects it for that direction, and off-cluster ends have no policies here)."""

    def side_allows(pod_end: Endpoint, other: Endpoint, direction: str) -> bool:
        if pod_end.cidr:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        selecting = [
            p
            for p in policies
            if p["metadata"].get("namespace") == pod_end.namespace
            and direction in _policy_types(p)
            and selector_matches(p["spec"].get("podSelector"), pod_end.labels)
        ]
        if not selecting:
            return True
        for policy in selecting:
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key) or []
                namespace = policy["metadata"]["namespace"]
                if (not peers or any(peer_selects(p, namespace, other) for p in peers)) and (
                    ports_admit(rule.get("ports"), port, protocol)
                ):
                    return True
        return False

    return side_allows(source, target, "Egress") and side_allows(target, source, "Ingress")


def pod_labels_of(docs: list[dict[str, Any]], service: str) -> Endpoint:
    deployment = named(docs, "Deployment", service)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return pod(deployment["metadata"]["namespace"], **labels)


def datastore_endpoints(docs: list[dict[str, Any]], owner: str) -> list[Endpoint]:
    """The owner's MongoDB: operator pods with the datastore label, plus every ipBlock the
    owner's egress policies open on the MongoDB port (the managed-service form)."""
    endpoints = [pod(DATASTORE_NAMESPACE, **{DATASTORE_LABEL: owner})]
    owner_pod = pod_labels_of(docs, owner)
    for policy in of_kind(docs, "NetworkPolicy"):
        if not selector_matches(policy["spec"].get("podSelector"), owner_pod.labels):
            continue
        for rule in policy["spec"].get("egress") or []:
            if rule.get("ports") and ports_admit(rule["ports"], MONGO_PORT):
                endpoints += [
                    Endpoint(cidr=p["ipBlock"]["cidr"])
                    for p in rule.get("to", [])
                    if "ipBlock" in p
                ]
    return endpoints


def check_kustomization_lists_every_file(kustomization: dict[str, Any]) -> None:
    files = {p.name for p in K8S.iterdir() if p.is_file()} - {"kustomization.yaml"}
    listed = set(kustomization.get("resources", []))
    assert files == listed, f"not listed: {files - listed}; missing: {listed - files}"


def check_deployment(docs: list[dict[str, Any]], service: str) -> None:
    deployment = named(docs, "Deployment", service)
    spec = deployment["spec"]
    template = spec["template"]
    assert selector_matches(spec["selector"], template["metadata"]["labels"])
    pod_spec = template["spec"]
    pod_security = pod_spec.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True
    assert pod_security.get("runAsUser", 1) != 0
    assert pod_spec.get("automountServiceAccountToken") is False
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID")
    assert len(pod_spec["containers"]) == 1
    container = pod_spec["containers"][0]
    port = PORTS[service]
    named_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in named_ports.values()

    def probe_target(kind: str) -> tuple[str, int]:
        probe = container.get(kind)
        assert probe, f"{service}: no {kind}"
        get = probe["httpGet"]
        return get["path"], named_ports.get(get["port"], get["port"])

    assert probe_target("readinessProbe") == ("/readyz", port)
    assert probe_target("livenessProbe") == ("/healthz", port)
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{service}: {bound}"
    security = container.get("securityContext", {})
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
    assert security.get("readOnlyRootFilesystem") is True
    assert security.get("allowPrivilegeEscalation") is False
    assert not security.get("privileged")
    assert "ALL" in security.get("capabilities", {}).get("drop", [])
    assert not security.get("capabilities", {}).get("add")


def check_secrets_are_references_only(docs: list[dict[str, Any]]) -> None:
    assert not of_kind(docs, "Secret"), "secret values do not belong in the manifests"
    for deployment in of_kind(docs, "Deployment"):
        service = deployment["metadata"]["name"]
        pod_spec = deployment["spec"]["template"]["spec"]
        referenced: set[str] = set()
        for volume in pod_spec.get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    referenced.add(source["secret"]["name"])
        items = {volume["name"]: [item["path"] for source in volume.get("projected", {}).get("sources", [])
                                  for item in source.get("secret", {}).get("items", [])]
                 for volume in pod_spec.get("volumes", [])}
        for container in pod_spec["containers"]:
            mounted = {f"{mount['mountPath']}/{path}" for mount in container.get("volumeMounts", [])
                       for path in items.get(mount["name"], [])}
            names = {env["name"] for env in container.get("env", [])}
            if service in SERVICES:
                for required in production_key_files(service):
                    assert required in names, f"{service} would refuse to start: {required} unset"
            for env in container.get("env", []):
                value = str(env.get("value", ""))
                if env["name"].endswith("_FILE") and value.startswith("/run/secrets/"):
                    assert value in mounted, f"{service}: {env['name']} names {value}, not mounted"
                if env["name"].endswith("_FILES"):  # comma-separated, e.g. previous KEKs
                    for path in filter(None, (p.strip() for p in value.split(","))):
                        assert path in mounted, f"{service}: {env['name']} names {path}, not mounted"
                assert not re.search(r"mongodb(\+srv)?://[^/\s]*@", value), env["name"]
                assert "PRIVATE KEY" not in value, env["name"]
                secret_ref = env.get("valueFrom", {}).get("secretKeyRef")
                if secret_ref:
                    referenced.add(secret_ref["name"])
                if env["name"].endswith("_MONGO_URL"):
                    pytest.fail(f"{service}: pass the MongoDB URL as a file (*_MONGO_URL_FILE)")
        assert referenced, f"{service} mounts no Secret"
        for name in referenced:
            # Each service's Secrets are named after it: records never mounts a psychnotes key.
            assert name.startswith(f"{service}-"), f"{service} mounts Secret {name}"


def test_a_gateway_kek_rotation_overlay_finds_the_previous_kek_mounted(k8s: Any) -> None:
    """deploy/README "Rotating the gateway's KEK": an overlay adds SIGNING_PREVIOUS_KEK_FILES; the
    base already projects the optional Secret that holds that file, so a gateway started during
    the rotation finds it. A path nothing mounts would refuse start-up, and this check says so."""
    import copy

    for path, mounted in (("/run/secrets/mindchart/signing-kek-previous", True),
                          ("/run/secrets/mindchart/elsewhere", False)):
        docs = copy.deepcopy(k8s[1])
        [gateway] = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "gateway"]
        container = gateway["spec"]["template"]["spec"]["containers"][0]
        container["env"].append({"name": "MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES", "value": path})
        if mounted:
            check_secrets_are_references_only(docs)
        else:
            with pytest.raises(AssertionError, match="not mounted"):
                check_secrets_are_references_only(docs)


def check_scaling(docs: list[dict[str, Any]], service: str) -> None:
    labels = pod_labels_of(docs, service).labels
    hpas = [
        h
        for h in of_kind(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        and h["spec"]["scaleTargetRef"]["name"] == service
    ]
    assert len(hpas) == 1, f"{service}: {len(hpas)} HorizontalPodAutoscalers"
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"]
    pdbs = [
        p
        for p in of_kind(docs, "PodDisruptionBudget")
        if selector_matches(p["spec"]["selector"], labels)
    ]
    assert len(pdbs) == 1, f"{service}: {len(pdbs)} PodDisruptionBudgets"
    pdb = pdbs[0]["spec"]
    assert pdbs[0]["apiVersion"] == "policy/v1"
    assert "minAvailable" in pdb or "maxUnavailable" in pdb
    if "minAvailable" in pdb:
        assert int(pdb["minAvailable"]) < hpa["spec"]["minReplicas"], "PDB would block drains"


def check_only_gateway_is_exposed(docs: list[dict[str, Any]]) -> None:
    for service in of_kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
        assert not service["spec"].get("externalIPs")
    for ingress in of_kind(docs, "Ingress"):
        for rule in ingress["spec"].get("rules", []):
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == "gateway", path
        default = ingress["spec"].get("defaultBackend")
        assert not default or default["service"]["name"] == "gateway"


def check_network_isolation(docs: list[dict[str, Any]]) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    namespace = named(docs, "Deployment", "gateway")["metadata"]["namespace"]
    assert any(
        p["metadata"].get("namespace") == namespace
        and p["spec"].get("podSelector") in ({}, None)
        and set(_policy_types(p)) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ), "no default-deny NetworkPolicy for ingress and egress"

    pods = {s: pod_labels_of(docs, s) for s in SERVICES}
    ingress_controller = pod("ingress-nginx", **{POD_NAME_LABEL: "ingress-nginx"})
    stranger = pod("elsewhere", app="anything")
    neighbour = pod(namespace, app="some-other-workload")
    internet = Endpoint(cidr="8.8.8.8/32")
    dns = pod("kube-system", **{"k8s-app": "kube-dns"})

    # The stack works: the flows it needs are open.
    assert flow_allowed(policies, ingress_controller, pods["gateway"], PORTS["gateway"])
    for backend in BACKENDS:
        assert flow_allowed(policies, pods["gateway"], pods[backend], PORTS[backend]), backend
        assert flow_allowed(policies, pods[backend], pods["gateway"], PORTS["gateway"]), backend
    for service in SERVICES:
        assert flow_allowed(policies, pods[service], dns, 53, "UDP"), f"{service}: no DNS"
        for endpoint in datastore_endpoints(docs, service):
            assert flow_allowed(policies, pods[service], endpoint, MONGO_PORT), (service, endpoint)

    # Each datastore is reachable by its owner only: records never reaches psychnotes' MongoDB.
    for owner in SERVICES:
        others = {s: pods[s] for s in SERVICES if s != owner}
        others["another workload in the namespace"] = neighbour
        for endpoint in datastore_endpoints(docs, owner):
            for who, source in others.items():
                assert not flow_allowed(policies, source, endpoint, MONGO_PORT), (
                    f"{who} can reach the {owner} datastore at {endpoint}"
                )

    # Only the gateway is reachable from outside, and only the gateway reaches the backends.
    for source in (stranger, neighbour, internet):
        for service in SERVICES:
            assert not flow_allowed(policies, source, pods[service], PORTS[service]), (
                f"{source} reaches {service}"
            )
    for backend in BACKENDS:
        for source in (ingress_controller, *(pods[s] for s in BACKENDS if s != backend)):
            assert not flow_allowed(policies, source, pods[backend], PORTS[backend]), (
                f"{source} reaches {backend}"
            )
        # Structurally too: backend ingress peers are same-namespace gateway pods, nothing wider.
        for policy in policies:
            if not selector_matches(policy["spec"].get("podSelector"), pods[backend].labels):
                continue
            for rule in policy["spec"].get("ingress") or []:
                assert rule.get("from"), f"{policy['metadata']['name']} admits everyone"
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, peer
                    assert selector_matches(peer["podSelector"], pods["gateway"].labels)
                    for other in BACKENDS:
                        assert not selector_matches(peer["podSelector"], pods[other].labels)


def check_config(docs: list[dict[str, Any]]) -> None:
    """The non-secret environment each Deployment ends up with, checked like compose's."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(docs, "ConfigMap")}
    env: dict[str, dict[str, str]] = {}
    for service in SERVICES:
        container = named(docs, "Deployment", service)["spec"]["template"]["spec"]["containers"][0]
        merged: dict[str, str] = {}
        for source in container.get("envFrom", []):
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"{service}: ConfigMap {name} does not exist"
            merged.update(configmaps[name])
        merged.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        assert merged.get("MINDCHART_ENV") == "production", service
        env[service] = merged
    check_issuer_and_audiences(env)


@pytest.fixture(scope="module")
def k8s() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return load_k8s_sources()


def test_kustomization_lists_every_file(k8s: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    check_kustomization_lists_every_file(k8s[0])


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_probes_resources_and_security(k8s: Any, service: str) -> None:
    check_deployment(k8s[1], service)


@pytest.mark.parametrize("service", SERVICES)
def test_autoscaler_and_disruption_budget(k8s: Any, service: str) -> None:
    check_scaling(k8s[1], service)


def test_manifests_reference_secrets_without_values(k8s: Any) -> None:
    check_secrets_are_references_only(k8s[1])


def test_only_the_gateway_is_exposed(k8s: Any) -> None:
    check_only_gateway_is_exposed(k8s[1])


def test_network_policies_isolate_the_datastores(k8s: Any) -> None:
    check_network_isolation(k8s[1])


def test_configmaps_agree_on_issuer_and_audiences(k8s: Any) -> None:
    check_config(k8s[1])


def _renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(
    _renderer() is None,
    reason="neither kustomize nor kubectl is on PATH; the YAML-level checks above still ran",
)
def test_kustomize_renders_and_rendered_output_keeps_the_rules() -> None:
    command = [*(_renderer() or []), str(K8S)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    named(docs, "Namespace", "mindchart")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "mindchart"
    }
    for service in SERVICES:
        check_deployment(docs, service)
        check_scaling(docs, service)
    check_secrets_are_references_only(docs)
    check_only_gateway_is_exposed(docs)
    check_network_isolation(docs)
    check_config(docs)

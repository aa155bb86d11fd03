"""Shared fixtures: databases (SQLite and PostgreSQL), running nodes, senders, brokers.

PostgreSQL tests use a fresh database per test, copied from a migrated template; they are skipped
when the server at 127.0.0.1:5432 is unreachable, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from db import audit
from db.audit_keys import AuditKeys
from db.session import Database
from dicom_node.archive import Archive
from dicom_node.server import NodeConfig
from dicom_node.service import NodeService

# Re-exported: tests import these from here.
from tests.kit.dcmtk import ECHOSCU, STORESCU, echoscu, storescu  # noqa: F401
from tests.kit.net import (
    free_port,  # noqa: F401
    wait_until,
)
from tests.kit.redis import RedisServer

PrivateRedis = RedisServer  # the name the reliability tests know

PG_DSN = os.environ.get("RADAI_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PG_URL_BASE = os.environ.get("RADAI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
SAMPLES_CACHE: dict[str, list[Path]] = {}


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1):
    """Poll until predicate() is truthy; return its value or fail the test with a message."""
    try:
        return wait_until(predicate, timeout, interval)
    except TimeoutError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session", autouse=True)
def audit_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditKeys]:
    """One audit key for the session, as one deployment has one: this process keys its entries
    with it, and `radai` subprocesses get it through RADAI_AUDIT_KEY_FILE (see radai_env)."""
    path = tmp_path_factory.mktemp("audit-key") / "audit.key"
    keys = AuditKeys.load(path)
    audit.configure(keys)
    os.environ["RADAI_AUDIT_KEY_FILE"] = str(path)
    yield keys
    os.environ.pop("RADAI_AUDIT_KEY_FILE", None)
    audit.configure(None)


@pytest.fixture(autouse=True)
def _session_audit_keys(audit_key: AuditKeys) -> Iterator[None]:
    """Give every test the session's audit keys back afterwards: the keys are process-wide, and
    code under test (the dashboard in AppTest, the audit tests) may configure others, with a
    checkpoint folder that later tests' databases would then be held against."""
    yield
    audit.configure(audit_key)


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    if not _pg_available():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    name = f"radai_tpl_{os.getpid()}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    db = Database(f"{PG_URL_BASE}/{name}")
    db.upgrade()
    db.dispose()
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _make_pg(template: str) -> tuple[Database, Callable[[], None]]:
    name = f"radai_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    db = Database(f"{PG_URL_BASE}/{name}")

    def drop() -> None:
        db.dispose()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return db, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'radai.sqlite'}")
        db.upgrade()
        yield db
        db.dispose()
    else:
        db, drop = _make_pg(request.getfixturevalue("pg_template"))
        yield db
        drop()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'radai.sqlite'}")
    db.upgrade()
    yield db
    db.dispose()


class RecordingPublisher:
    """Stands in for the broker in tests of the node alone: records, or fails while `down`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.down = False

    def __call__(self, task: str, payload: dict) -> None:
        if self.down:
            raise ConnectionError("broker down (test)")
        self.sent.append((task, payload))


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeService]]:
    """Start NodeService instances on free ports; all are stopped at teardown."""
    started: list[NodeService] = []

    def make(
        db: Database,
        *,
        publish=None,  # noqa: ANN001
        stable_seconds: float = 1.0,
        home: Path | None = None,
        port: int = 0,
        **config,  # noqa: ANN003
    ) -> NodeService:
        home = home or tmp_path / "home"
        service = NodeService(
            db,
            Archive(home / "archive", home / "quarantine"),
            NodeConfig(host="127.0.0.1", port=port, **config),
            stable_seconds=stable_seconds,
            publish=publish or RecordingPublisher(),
            poll_seconds=0.1,
            backoff_cap=1.0,
        )
        service.dispatcher.backoff_base = 0.2
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from dicom_node.samples import build_sample_studies

    return build_sample_studies(tmp_path_factory.mktemp("samples"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], int]]:
    """Start private redis-server processes on free ports (for tests that stop the broker)."""
    servers: list[RedisServer] = []

    def start(port: int | None = None) -> int:
        server = RedisServer(port=port)
        server.start()
        servers.append(server)
        start.proc = server.proc  # type: ignore[attr-defined]
        return server.port

    yield start
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(timeout=10)


def radai_env(home: Path, db_url: str, broker_url: str, queue: str, **extra: str) -> dict:
    """The environment of a `radai` subprocess: this one's, minus RADAI_* but the session's
    audit key, plus the given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(
        RADAI_AUDIT_KEY_FILE=os.environ["RADAI_AUDIT_KEY_FILE"],
        RADAI_HOME=str(home),
        RADAI_DATABASE_URL=db_url,
        RADAI_BROKER_URL=broker_url,
        RADAI_QUEUE=queue,
        RADAI_IO_QUEUE=queue + ".io",
        # A node's DICOMweb must not take a fixed port that parallel tests would share.
        RADAI_DICOMWEB_PORT=str(free_port()),
        **extra,
    )
    return env


@pytest.fixture
def radai_workers(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `radai worker` processes (solo pool, one task at a time); stopped at teardown.

    Each writes its stdout and stderr to tmp_path/<name>.log."""
    procs: list[subprocess.Popen] = []

    def start(env: dict, name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "radai", "worker", "--name", f"{name}@%h"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with an append-only file, as docker-compose.yml runs it."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    yield redis
    if redis.proc is not None and redis.proc.poll() is None:
        redis.proc.terminate()
        redis.proc.wait(timeout=10)

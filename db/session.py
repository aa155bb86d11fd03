"""Engines and sessions for SQLite and PostgreSQL, and schema upgrades through Alembic."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_setup(engine: Engine, synchronous: str = "FULL") -> None:
    # pysqlite's own transaction handling defers BEGIN; we take the write lock at the start
    # (BEGIN IMMEDIATE) so that concurrent writers queue on busy_timeout instead of failing
    # with "database is locked" when a read turns into a write.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """One database: its engine, a session factory and its migrations."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"timeout": 30})
            _sqlite_setup(self.engine)
        else:
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True
            )
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self._deferred: sessionmaker | None = None
        self._deferred_lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on any error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    @contextmanager
    def deferred_session(self) -> Iterator[Session]:
        """A session whose commit does not wait for the disk: visible to every reader at once,
        durable at the next `make_durable()` (or the database's own next flush).

        Only for writers that hold a durable copy of what they record elsewhere and redo it at
        their next start (the DICOM node's ingest journal). SQLite: synchronous=NORMAL on its own
        connections (WAL: only a crash of the machine, which restarts the writer too, can lose
        the last commits; nothing is corrupted). PostgreSQL commits as usual: its server can crash
        and lose asynchronous commits while the writer runs on, with nothing to tell it to redo
        them (and it syncs its WAL for concurrent commits together anyway).
        """
        with self._deferred_factory()() as session, session.begin():
            yield session

    @contextmanager
    def deferred_driver_connection(self) -> Iterator[Any]:
        """The driver's own connection behind `deferred_session` (sqlite3 in autocommit mode, or
        psycopg), for a hot path that writes plain SQL and commits or rolls back itself. Back to
        the pool afterwards, rolled back if the caller left a transaction open."""
        engine = self._deferred_factory().kw["bind"]
        pooled = engine.raw_connection()
        try:
            yield pooled.driver_connection
        finally:
            pooled.close()

    def _deferred_factory(self) -> sessionmaker:
        with self._deferred_lock:
            if self._deferred is None:
                if self.is_sqlite:
                    engine = create_engine(self.url, connect_args={"timeout": 30})
                    _sqlite_setup(engine, synchronous="NORMAL")
                    self._deferred = sessionmaker(engine, expire_on_commit=False)
                else:
                    self._deferred = self.sessionmaker
            return self._deferred

    def make_durable(self) -> None:
        """Return once every transaction committed before the call is on disk."""
        if self.is_sqlite:
            path = self.url.removeprefix("sqlite:///")
            if not self.url.startswith("sqlite:///") or path.startswith(":memory:"):
                return
            # A commit lives in the WAL until a checkpoint copies it into the database file, and
            # every completed checkpoint fsyncs the database file before the WAL is reused:
            # syncing the WAL makes every earlier commit durable. Never the database file itself:
            # closing any descriptor of it drops this process's POSIX locks on it (SQLite's).
            try:
                fd = os.open(f"{path}-wal", os.O_RDONLY)
            except FileNotFoundError:
                return  # no WAL: everything is checkpointed into the (synced) database file
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        # PostgreSQL: `deferred_session` commits synchronously; nothing is left to sync.

    def alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        command.upgrade(self.alembic_config(), revision)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._deferred is not None and self._deferred is not self.sessionmaker:
            bind = self._deferred.kw.get("bind")
            if bind is not None:
                bind.dispose()

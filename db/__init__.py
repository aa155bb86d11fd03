"""radai's persistence: SQLAlchemy 2 models, engines and sessions, Alembic migrations, the outbox
and the append-only, hash-chained audit log (keyed entries, signed checkpoints kept outside the
database: `audit`, `audit_keys`, `audit_checkpoints`).

Each contract has one home: a study's states and the only way to change them (`lifecycle`), its
safety flags and holds (`flags`), the audit actions (`audit_actions.AuditAction`), the outbox's
task names and payloads (`outbox_tasks`), people's retry and release requests (`requeue`), and
the job leases that bring back a lost worker's study (`leases`).

SQLite by default, PostgreSQL in production; the same code and migrations serve both. This package
imports nothing of radai's (only SQLAlchemy, Alembic and `cryptography`): every other package may
import it. Paths and keys come in from the caller (`audit.configure`), never from settings.
"""

from db.models import (
    ApiToken,
    AuditEntry,
    Base,
    Export,
    IngestFailure,
    Instance,
    InstanceConflict,
    Job,
    LoginAttempt,
    OutboxMessage,
    Output,
    QidoSeries,
    QidoStudy,
    Review,
    ReviewDecision,
    Series,
    Study,
    StudyState,
    User,
    UserRole,
)
from db.session import Database

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Base",
    "Export",
    "Database",
    "IngestFailure",
    "Instance",
    "InstanceConflict",
    "Job",
    "LoginAttempt",
    "OutboxMessage",
    "Output",
    "QidoSeries",
    "QidoStudy",
    "Review",
    "ReviewDecision",
    "Series",
    "Study",
    "StudyState",
    "User",
    "UserRole",
]

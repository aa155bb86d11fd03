"""radai's persistence: SQLAlchemy 2 models, engines and sessions, Alembic migrations, the outbox
and the append-only, hash-chained audit log.

SQLite by default, PostgreSQL in production; the same code and migrations serve both. This package
imports nothing of radai's (only SQLAlchemy and Alembic): every other package may import it.
"""

from db.models import (
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
    "Review",
    "ReviewDecision",
    "Series",
    "Study",
    "StudyState",
    "User",
    "UserRole",
]

"""The dashboard's database side on SQLite and PostgreSQL: accounts and password hashes, the retry
request, reviews (validated, audited, append-only, kept across reprocessing) and the worklist's
order and "reviewed" flag."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from dashboard import store
from db import AuditEntry, Job, OutboxMessage, Review, Study, StudyState, User, audit
from db.models import utcnow
from db.requeue import request_retry
from db.users import (
    add_user,
    authenticate,
    check_credentials,
    hash_password,
    list_users,
    reset_password,
    set_disabled,
    verify_password,
)


def test_password_hashes_are_salted_scrypt():
    a, b = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-pass", a) and not verify_password("s3cret-pasS", a)
    assert not verify_password("s3cret-pass", "md5$garbage") and not verify_password("x", "")


def test_users_authenticate_by_name_and_password(database):
    with database.session() as s:
        add_user(s, "alice", "radiologist", "long enough", actor="test")
        with pytest.raises(ValueError, match="already exists"):
            add_user(s, "alice", "admin", "long enough")
        with pytest.raises(ValueError, match="role"):
            add_user(s, "bob", "janitor", "long enough")
        with pytest.raises(ValueError, match="at least"):
            add_user(s, "bob", "admin", "short")
    with database.session() as s:
        user = authenticate(s, "alice", "long enough")
        assert user is not None and user.role == "radiologist" and not user.disabled
        assert "long enough" not in user.password_hash
        assert authenticate(s, "alice", "wrong") is None
        assert check_credentials(s, "nobody", "long enough") == (None, "unknown user")
        user.disabled = True
    with database.session() as s:
        assert check_credentials(s, "alice", "long enough") == (None, "disabled")
        [entry] = s.execute(select(AuditEntry).where(AuditEntry.action == "user.added")).scalars()
        assert entry.actor == "test" and entry.detail == {"name": "alice", "role": "radiologist"}
    with pytest.raises(IntegrityError):
        with database.session() as s:
            s.add(User(name="mallory", role="superuser", password_hash="x"))


READER = store.SessionUser(0, "reader", "admin")
AUDITOR = store.SessionUser(0, "auditor", "auditor")


def _study(db, uid: str, state: str = StudyState.DONE, **kw) -> int:  # noqa: ANN001
    with db.session() as s:
        study = Study(study_uid=uid, state=state, instance_count=kw.pop("instances", 2), **kw)
        s.add(study)
        s.flush()
        return study.id


def _job(db, study_id: int, key: str, lesions=(1, 2), **kw) -> int:  # noqa: ANN001
    findings = {
        "screening_probability": 0.7,
        "lesions": [{"label": n, "slice_index": n} for n in lesions],
        "series_uid": "1.2.3.4",
    }
    with db.session() as s:
        job = Job(
            study_id=study_id,
            pipeline="p",
            pipeline_version="0.1.0",
            input_hash=key,
            state=StudyState.DONE,
            findings=findings,
            model_versions={"model-a": "1.0"},
            **kw,
        )
        s.add(job)
        s.flush()
        return job.id


def test_retry_request_writes_state_outbox_and_audit_in_one_go(database):
    _study(database, "1.2.9", StudyState.FAILED, error="boom", instances=7)
    _study(database, "1.2.10", StudyState.RECEIVING)
    with database.session() as s:
        request_retry(s, "1.2.9", actor="root")
    with database.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == "1.2.9")).scalar_one()
        [msg] = s.execute(select(OutboxMessage)).scalars()
        [entry] = s.execute(select(AuditEntry).where(AuditEntry.action == "study.retry")).scalars()
    assert study.state == StudyState.STABLE and study.error is None
    assert msg.task == "radai.process_study" and msg.published_at is None
    assert msg.payload == {"study_uid": "1.2.9", "instances": 7}
    assert entry.actor == "root" and entry.detail["from_state"] == "FAILED"
    for uid, match in (("1.2.10", "RECEIVING"), ("9.9.9", "no study")):
        with pytest.raises(ValueError, match=match):
            with database.session() as s:
                request_retry(s, uid, actor="root")
    with database.session() as s:
        assert len(s.execute(select(OutboxMessage)).all()) == 1 and audit.verify(s).ok


def test_reviews_are_validated_audited_append_only_and_survive_reprocessing(database):
    study_id = _study(database, "1.2.20", priority=2)
    job1 = _job(database, study_id, "a")
    with database.session() as s:
        user = add_user(s, "doc", "radiologist", "long enough")
        me = store.SessionUser(user.id, user.name, user.role)
    common = {"study_uid": "1.2.20", "job_id": job1, "note": None, "user": me}
    for kw, match in (
        ({"lesion_label": 1, "decision": "reject", "reason": " "}, "reason is required"),
        ({"lesion_label": 1, "decision": "maybe", "reason": "x"}, "decision"),
        ({"lesion_label": 7, "decision": "accept", "reason": None}, "not in this result"),
    ):
        with pytest.raises(ValueError, match=match):
            with database.session() as s:
                store.add_review(s, **common, **kw)
    with database.session() as s:
        store.add_review(s, **common, lesion_label=1, decision="accept", reason=None)
        store.add_review(s, **common, lesion_label=1, decision="reject", reason="artefact")
        store.add_review(s, **common, lesion_label=None, decision="amend", reason="two nodules")
    with database.session() as s:
        page = store.worklist(s, user=READER)
        reviews = store.reviews_of(s, study_id)
        actions = [
            e.action for e in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
        ]
    assert page.rows[0]["reviewed"] is True
    latest = store.latest_reviews(reviews, job1)
    assert latest[1]["decision"] == "reject" and latest[None]["decision"] == "amend"
    assert reviews[0]["model"] == "model-a 1.0" and reviews[0]["user"] == "doc"
    assert actions[-3:] == ["review.accept", "review.reject", "review.amend"]

    # The database itself refuses to edit or delete a review.
    for sql in ("UPDATE reviews SET decision = 'accept'", "DELETE FROM reviews"):
        with pytest.raises(DBAPIError, match="append-only"):
            with database.engine.begin() as conn:
                conn.execute(text(sql))

    # Reprocessing: a new job supersedes the old; the reviews stay with the old job.
    with database.session() as s:
        s.execute(update(Job).where(Job.id == job1).values(superseded=True))
    job2 = _job(database, study_id, "b", lesions=(1,))
    with database.session() as s:
        assert len(s.execute(select(Review)).all()) == 3
        row = store.worklist(s, user=READER).rows[0]
        assert row["job_id"] == job2 and row["reviewed"] is False
        assert store.worklist(s, user=READER, reviewed=False).total == 1
        assert store.worklist(s, user=READER, reviewed=True).total == 0
        detail = store.study_detail(s, "1.2.20", user=READER)
    assert detail["current_job_id"] == job2 and len(detail["reviews"]) == 3
    assert store.latest_reviews(detail["reviews"], job2) == {}


def test_worklist_order_filters_and_pages(database):
    t0 = utcnow()
    specs = [("1.1", 3, 0), ("1.2", None, 1), ("1.3", 1, 2), ("1.4", 3, -1), ("1.5", None, -2)]
    for uid, prio, minutes in specs:
        _study(database, uid, priority=prio, first_received_at=t0 + timedelta(minutes=minutes))
    _study(
        database,
        "1.6",
        StudyState.FAILED,
        error="x",
        flagged=True,
        flag_reason="conflict",
        first_received_at=t0 + timedelta(minutes=5),
    )
    with database.session() as s:
        page = store.worklist(s, user=READER)
        assert [r["study_uid"] for r in page.rows] == ["1.3", "1.4", "1.1", "1.5", "1.2", "1.6"]
        failed = store.worklist(s, user=READER, states=["FAILED"], flagged=True)
        assert [r["study_uid"] for r in failed.rows] == ["1.6"] and failed.rows[0]["error"] == "x"
        assert store.worklist(s, user=READER, flagged=False).total == 5
        second = store.worklist(s, user=READER, page=2, page_size=4)
        assert second.pages == 2 and [r["study_uid"] for r in second.rows] == ["1.2", "1.6"]
        assert store.worklist(s, user=READER, page=99, page_size=4).page == 2


def test_audit_entries_filter_by_study_actor_and_time(database):
    with database.session() as s:
        audit.append(s, "alice", "study.opened", "1.2.3", {})
        audit.append(s, "bob", "study.opened", "1.2.4", {})
        audit.append(s, "alice", "user.logout", None, {})
    now = utcnow()
    with database.session() as s:
        assert [e["seq"] for e in store.audit_entries(s, user=AUDITOR)] == [3, 2, 1]
        assert [e["seq"] for e in store.audit_entries(s, user=AUDITOR, actor="alice")] == [3, 1]
        assert [e["seq"] for e in store.audit_entries(s, user=AUDITOR, study_uid="1.2.4")] == [2]
        assert store.audit_entries(s, user=AUDITOR, since=now + timedelta(seconds=1)) == []
        assert (
            len(store.audit_entries(s, user=AUDITOR, since=now - timedelta(hours=1), until=now))
            == 3
        )
        assert store.audit_actors(s, user=AUDITOR) == ["alice", "bob"]


LESION = {
    "label": 1,
    "slice_index": 1,
    "volume_mm3": 900.0,
    "max_3d_diameter_mm": 15.0,
    "max_2d_axial_diameter_mm": 13.0,
    "location": "right lung, upper zone",
}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"max_2d_axial_diameter_mm": -2}, "positive number of mm"),
        ({"max_2d_axial_diameter_mm": 0}, "positive number of mm"),
        ({"max_3d_diameter_mm": "twelve"}, "must be a number of mm"),
        ({"max_3d_diameter_mm": float("nan")}, "positive number"),
        ({"max_2d_axial_diameter_mm": 450}, "between 0.5 and 300 mm"),
        ({"volume_mm3": 5000}, "between 0.001 and 3000 ml"),
        # An axial diameter is one of the 3D diameters; no lesion outgrows its sphere.
        ({"max_2d_axial_diameter_mm": 20}, "cannot exceed the maximum 3D diameter"),
        ({"volume_mm3": 2.5}, "does not fit in a lesion whose largest diameter is 15 mm"),
        ({"location": "x" * 65}, "at most 64 characters"),
        ({"mean_hu": 40}, "cannot be corrected"),
    ],
)
def test_corrections_are_validated_with_clear_messages(given, message):
    with pytest.raises(ValueError, match=message):
        store.validate_corrections(LESION, given)


def test_corrections_keep_the_model_value_beside_the_corrected_one():
    assert store.validate_corrections(LESION, {}) is None
    # Empty fields and values equal to the model's are "unchanged".
    unchanged = {"max_3d_diameter_mm": None, "volume_mm3": 0.9, "location": " "}
    assert store.validate_corrections(LESION, unchanged) is None
    out = store.validate_corrections(
        LESION,
        {"max_2d_axial_diameter_mm": 19.5, "max_3d_diameter_mm": 21, "volume_mm3": 2.5},
    )
    assert out == {
        "max_2d_axial_diameter_mm": {"model": 13.0, "corrected": 19.5},
        "max_3d_diameter_mm": {"model": 15.0, "corrected": 21.0},
        "volume_mm3": {"model": 900.0, "corrected": 2500.0},  # typed in ml, stored in mm3
    }
    text = store.describe_corrections(out)
    assert "long-axis diameter 19.5 mm (model 13)" in text and "volume 2.5 ml (model 0.9)" in text


def test_amend_stores_corrections_append_only(database):
    study_id = _study(database, "1.2.30", priority=2)
    job = _job(database, study_id, "a")
    with database.session() as s:
        user = add_user(s, "doc", "radiologist", "long enough")
        me = store.SessionUser(user.id, user.name, user.role)
    common = {"study_uid": "1.2.30", "job_id": job, "note": None, "user": me}
    fix = {"max_3d_diameter_mm": 8.0}
    for kw in (
        {"lesion_label": 1, "decision": "accept", "reason": None},
        {"lesion_label": None, "decision": "amend", "reason": "x"},
    ):
        with pytest.raises(ValueError, match="go with an amend of one lesion"):
            with database.session() as s:
                store.add_review(s, **common, **kw, corrections=fix)
    with database.session() as s:
        store.add_review(
            s, **common, lesion_label=2, decision="amend", reason="smaller", corrections=fix
        )
    with database.session() as s:
        [review] = store.reviews_of(s, study_id)
        [entry] = s.execute(select(AuditEntry).where(AuditEntry.action == "review.amend"))
    # The test job's lesions carry no measurements: the model value is recorded as unknown.
    expected = {"max_3d_diameter_mm": {"model": None, "corrected": 8.0}}
    assert review["corrections"] == expected and entry[0].detail["corrections"] == expected
    assert "maximum 3D diameter 8 mm (model -)" in store.describe_corrections(expected)
    # Migration 0004 added the column without losing 0003's triggers.
    for sql in ("UPDATE reviews SET corrections = NULL", "DELETE FROM reviews"):
        with pytest.raises(DBAPIError, match="append-only"):
            with database.engine.begin() as conn:
                conn.execute(text(sql))


def test_account_changes_are_audited_and_guarded(database):
    with database.session() as s:
        add_user(s, "root", "admin", "long enough")
        add_user(s, "doc", "radiologist", "long enough")
    with database.session() as s:
        set_disabled(s, "doc", True, actor="root")
    with database.session() as s:
        assert check_credentials(s, "doc", "long enough") == (None, "disabled")
        with pytest.raises(ValueError, match="already disabled"):
            set_disabled(s, "doc", True, actor="root")
        with pytest.raises(ValueError, match="your own account"):
            set_disabled(s, "root", True, actor="root")
        with pytest.raises(ValueError, match="last enabled admin"):
            set_disabled(s, "root", True, actor="someone")
        with pytest.raises(ValueError, match="no user"):
            set_disabled(s, "ghost", True, actor="root")
        with pytest.raises(ValueError, match="at least"):
            reset_password(s, "doc", "short", actor="root")
    with database.session() as s:
        set_disabled(s, "doc", False, actor="root")
        reset_password(s, "doc", "another long one", actor="root")
    with database.session() as s:
        assert check_credentials(s, "doc", "long enough") == (None, "wrong password")
        assert authenticate(s, "doc", "another long one") is not None
        listed = list_users(s)
        entries = [
            (e.actor, e.action, e.detail)
            for e in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
        ]
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [
        ("doc", "radiologist", False),
        ("root", "admin", False),
    ]
    assert all("password_hash" not in u for u in listed)
    assert entries[2:] == [
        ("root", "user.disabled", {"name": "doc", "role": "radiologist"}),
        ("root", "user.enabled", {"name": "doc", "role": "radiologist"}),
        ("root", "user.password_reset", {"name": "doc"}),
    ]
    assert "another long one" not in str(entries)


def test_migration_0004_downgrades_and_upgrades_keeping_reviews_append_only(database):
    from alembic import command

    study_id = _study(database, "1.2.40")
    job = _job(database, study_id, "a")
    with database.session() as s:
        user = add_user(s, "doc", "radiologist", "long enough")
        s.add(
            Review(
                study_id=study_id,
                job_id=job,
                decision="accept",
                user_id=user.id,
                model_name="m",
                model_version="v",
            )
        )
    command.downgrade(database.alembic_config(), "0003")
    with database.engine.connect() as conn:
        columns = list(conn.execute(text("SELECT * FROM reviews")).keys())
    assert "corrections" not in columns
    with pytest.raises(DBAPIError, match="append-only"):
        with database.engine.begin() as conn:
            conn.execute(text("DELETE FROM reviews"))
    database.upgrade()
    with database.session() as s:
        [review] = s.execute(select(Review)).scalars()
        assert review.corrections is None and review.decision == "accept"


def test_the_store_refuses_what_a_role_may_not_do(database):
    """Roles are enforced in the store, whatever a page offers: each call below is made as the
    page of another role would make it, and leaves nothing behind."""
    study_id = _study(database, "1.2.50", state=StudyState.FAILED, error="boom")
    job = _job(database, study_id, "a")
    with database.session() as s:
        users_by_role = {
            role: store.SessionUser(
                add_user(s, f"u_{role}", role, "long enough").id, f"u_{role}", role
            )
            for role in ("radiologist", "admin", "auditor")
        }
    doc, root, eve = (users_by_role[r] for r in ("radiologist", "admin", "auditor"))
    review = {"study_uid": "1.2.50", "job_id": job, "lesion_label": 1, "note": None}
    refused = [
        (eve, lambda s, u: store.add_review(s, **review, decision="accept", reason=None, user=u)),
        (root, lambda s, u: store.add_review(s, **review, decision="accept", reason=None, user=u)),
        (eve, lambda s, u: store.worklist(s, user=u)),
        (eve, lambda s, u: store.study_detail(s, "1.2.50", user=u)),
        (eve, lambda s, u: store.series_paths(s, study_id, "1.2.3.4", user=u)),
        (doc, lambda s, u: store.retry_study(s, "1.2.50", user=u)),
        (eve, lambda s, u: store.retry_study(s, "1.2.50", user=u)),
        (doc, lambda s, u: store.audit_entries(s, user=u)),
        (doc, lambda s, u: store.audit_actors(s, user=u)),
        (doc, lambda s, u: store.add_account(s, "x", "admin", "long enough", user=u)),
        (eve, lambda s, u: store.set_account_disabled(s, "u_admin", True, user=u)),
        (doc, lambda s, u: store.reset_account_password(s, "u_admin", "long enough", user=u)),
        (eve, lambda s, u: store.list_accounts(s, user=u)),
        (doc, lambda s, u: store.failed_logins(s, user=u)),
    ]
    for who, call in refused:
        with pytest.raises(store.Forbidden, match=f"a {who.role} may not"):
            with database.session() as s:
                call(s, who)
    with database.session() as s:
        assert s.execute(select(Review)).first() is None
        assert s.execute(select(OutboxMessage)).first() is None
        assert [u["name"] for u in list_users(s)] == ["u_admin", "u_auditor", "u_radiologist"]
        assert not any(u["disabled"] for u in list_users(s))
        actions = set(s.execute(select(AuditEntry.action)).scalars())
    assert actions == {"user.added"}

    # The same calls as the roles that may make them succeed.
    with database.session() as s:
        store.add_review(s, **review, decision="accept", reason=None, user=doc)
        assert store.worklist(s, user=root).total == 1
        assert store.audit_actors(s, user=eve)
        store.retry_study(s, "1.2.50", user=root)
        store.add_account(s, "newbie", "auditor", "long enough", user=root)
    with database.session() as s:
        assert [a["name"] for a in store.list_accounts(s, user=root)][0] == "newbie"
        assert store.allowed(doc, "review") and not store.allowed(root, "review")

"""The dashboard's database side on SQLite and PostgreSQL: accounts and password hashes, the retry
request, reviews (validated, audited, append-only, kept across reprocessing) and the worklist's
order and "reviewed" flag."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from dashboard import store
from db import AuditEntry, Job, OutboxMessage, Review, Study, StudyState, User, audit
from db.audit_actions import AuditAction
from db.findings import SCHEMA_VERSION, Findings, Lesion
from db.flags import FlagKind, add_flag
from db.models import utcnow
from db.queries import study_summaries
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


def _lesion_v1(n: int) -> dict:
    # As the worker wrote lesions before db/findings.py (schema 1, before screener 2.0.0).
    return {
        "label": n,
        "slice_index": n,
        "volume_mm3": 500.0,
        "max_3d_diameter_mm": 12.0,
        "max_2d_axial_diameter_mm": 10.0,
        "centroid_zyx": [float(n), 10.0, 10.0],
        "mean_hu": -40.0,
        "location": "right lung, upper zone",
    }


def _findings_v1(lesions=(1, 2)) -> dict:  # noqa: ANN001
    return {
        "screening_probability": 0.7,
        "priority": 2,
        "lung_volume_ml": 4800.0,
        "lesions": [_lesion_v1(n) for n in lesions],
        "series_uid": "1.2.3.4",
    }


def _job(db, study_id: int, key: str, lesions=(1, 2), findings=None, **kw) -> int:  # noqa: ANN001
    findings = _findings_v1(lesions) if findings is None else findings
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


LESION = Lesion(
    label=1,
    slice_index=1,
    volume_mm3=900.0,
    max_3d_diameter_mm=15.0,
    max_2d_axial_diameter_mm=13.0,
    centroid_zyx=(1.0, 10.0, 10.0),
    location="right lung, upper zone",
)


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
    fix = {"max_3d_diameter_mm": 14.0}
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
    # The model's value, read from the job's findings, is kept beside the correction.
    expected = {"max_3d_diameter_mm": {"model": 12.0, "corrected": 14.0}}
    assert review["corrections"] == expected and entry[0].detail["corrections"] == expected
    assert "maximum 3D diameter 14 mm (model 12)" in store.describe_corrections(expected)
    assert "maximum 3D diameter 8 mm (model -)" in store.describe_corrections(
        {"max_3d_diameter_mm": {"model": None, "corrected": 8.0}}
    )
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


def _held(db, uid: str) -> int:  # noqa: ANN001
    """A HELD study with two flags: the mixed patients that hold it, then a conflict."""
    study_id = _study(db, uid, StudyState.HELD)
    with db.session() as s:
        add_flag(
            s,
            study_id,
            uid,
            FlagKind.PATIENTS_MIXED,
            "instances name 2 different patients",
            actor="node",
            action=AuditAction.STUDY_PATIENTS_MIXED,
            hold=True,
        )
        add_flag(
            s,
            study_id,
            uid,
            FlagKind.INSTANCE_CONFLICT,
            "second object for SOP Instance UID 1.2.3.9",
            actor="node",
        )
    return study_id


def test_release_is_for_radiologists_and_admins_and_is_audited(database):
    _held(database, "1.2.60")
    _held(database, "1.2.61")
    with database.session() as s:
        doc, root, eve = (
            store.SessionUser(add_user(s, name, role, "long enough").id, name, role)
            for name, role in (("doc", "radiologist"), ("root", "admin"), ("eve", "auditor"))
        )
    with database.session() as s:
        before = s.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
    # An auditor is refused by the store itself: the study stays HELD and nothing is written.
    with pytest.raises(store.Forbidden, match="a auditor may not release"):
        with database.session() as s:
            store.release_study(s, "1.2.60", "looked at it", user=eve)
    # Without a reason nothing happens either.
    with pytest.raises(ValueError, match="needs a reason"):
        with database.session() as s:
            store.release_study(s, "1.2.60", "  ", user=doc)
    with database.session() as s:
        assert s.execute(select(func.count()).select_from(AuditEntry)).scalar_one() == before
        assert s.execute(select(OutboxMessage)).first() is None
        assert store.study_detail(s, "1.2.60", user=doc)["state"] == StudyState.HELD

    with database.session() as s:
        store.release_study(s, "1.2.60", "same patient, renamed at the modality", user=doc)
        store.release_study(s, "1.2.61", "checked with the technologist", user=root)
    with database.session() as s:
        detail = store.study_detail(s, "1.2.60", user=doc)
        released = list(
            s.execute(
                select(AuditEntry)
                .where(AuditEntry.action == AuditAction.STUDY_RELEASED)
                .order_by(AuditEntry.seq)
            ).scalars()
        )
        messages = list(s.execute(select(OutboxMessage)).scalars())
        assert audit.verify(s).ok
    assert detail["state"] == StudyState.STABLE and detail["hold_reason"] is None
    assert [(e.study_uid, e.actor) for e in released] == [("1.2.60", "doc"), ("1.2.61", "root")]
    assert released[0].detail["reason"] == "same patient, renamed at the modality"
    assert released[0].detail["held_for"] == "instances name 2 different patients"
    assert len(messages) == 2
    # The flags stay: they are the study's history.
    assert [f["kind"] for f in detail["flags"]] == ["patients_mixed", "instance_conflict"]
    # Released once, it is no longer HELD: a second release is refused with a reason.
    with pytest.raises(ValueError, match="not HELD"):
        with database.session() as s:
            store.release_study(s, "1.2.60", "again", user=doc)
    assert store.allowed(doc, "release") and store.allowed(root, "release")
    assert not store.allowed(eve, "release")


def test_held_studies_are_filtered_and_show_every_flag(database):
    _held(database, "1.2.70")
    _study(database, "1.2.71")
    with database.session() as s:
        [row] = store.worklist(s, user=READER, states=[StudyState.HELD]).rows
        detail = store.study_detail(s, "1.2.70", user=READER)
        [summary] = [r for r in study_summaries(s) if r["study_uid"] == "1.2.70"]
    assert row["study_uid"] == "1.2.70" and row["state"] == StudyState.HELD
    # Both reasons, oldest first: the later conflict does not hide why it is held.
    assert row["flags"] == [
        "instances name 2 different patients",
        "second object for SOP Instance UID 1.2.3.9",
    ]
    assert row["hold_reason"] == detail["hold_reason"] == "instances name 2 different patients"
    assert [(f["kind"], f["reason"]) for f in detail["flags"]] == [
        ("patients_mixed", "instances name 2 different patients"),
        ("instance_conflict", "second object for SOP Instance UID 1.2.3.9"),
    ]
    assert all(f["at"] for f in detail["flags"]) and summary["flags"] == detail["flags"]


def test_schema_1_findings_read_through_db_findings(database):
    """A job written before findings had a schema version (and a lesion without a screener
    probability) reads as `Findings` in the worklist, the study page and `radai studies`."""
    study_id = _study(database, "1.2.80", priority=2)
    stored = _findings_v1((1, 2))
    assert "schema" not in stored and "screening_probability" not in stored["lesions"][0]
    job = _job(database, study_id, "a", findings=stored)
    with database.session() as s:
        [row] = store.worklist(s, user=READER).rows
        detail = store.study_detail(s, "1.2.80", user=READER)
        [summary] = study_summaries(s)
    assert (row["probability"], row["lesions"]) == (0.7, 2)
    [current] = detail["jobs"]
    findings = current["findings"]
    assert isinstance(findings, Findings) and current["findings_error"] is None
    assert findings.pipeline is None and findings.lesion(2).screening_probability is None
    assert findings.lesion(2).volume_mm3 == 500.0
    # `radai studies --json` gives today's shape: schema 2, every lesion key present.
    assert summary["findings"] == Findings.from_json(stored).to_json()
    assert summary["findings"]["schema"] == SCHEMA_VERSION and summary["findings_error"] is None
    assert summary["findings"]["lesions"][0]["screening_probability"] is None

    # Findings no schema reads: the listing and the page go on, the review is refused clearly.
    broken = _study(database, "1.2.81", priority=1)
    bad_job = _job(database, broken, "b", findings={"lesions": [{"label": 1}]})
    with database.session() as s:
        rows = {r["study_uid"]: r for r in store.worklist(s, user=READER).rows}
        bad = store.study_detail(s, "1.2.81", user=READER)
        summaries = {r["study_uid"]: r for r in study_summaries(s)}
        user = add_user(s, "doc", "radiologist", "long enough")
        me = store.SessionUser(user.id, user.name, user.role)
    assert rows["1.2.81"]["probability"] is None and rows["1.2.80"]["lesions"] == 2
    assert bad["jobs"][0]["findings"] is None
    assert f"findings of job {bad_job} cannot be read" in bad["jobs"][0]["findings_error"]
    assert summaries["1.2.81"]["findings"] is None and summaries["1.2.81"]["findings_error"]
    with pytest.raises(ValueError, match="cannot be read"):
        with database.session() as s:
            store.add_review(
                s,
                study_uid="1.2.81",
                job_id=bad_job,
                lesion_label=1,
                decision="accept",
                reason=None,
                note=None,
                user=me,
            )
    with database.session() as s:
        store.add_review(
            s,
            study_uid="1.2.80",
            job_id=job,
            lesion_label=2,
            decision="accept",
            reason=None,
            note=None,
            user=me,
        )


def test_every_action_the_dashboard_appends_is_an_audit_action(database):
    """A session's worth of dashboard actions through the store: each entry's action is a
    member of `AuditAction`, and a spelled-out string is refused before it reaches the trail."""
    study_id = _study(database, "1.2.90", priority=1)
    job = _job(database, study_id, "a")
    _study(database, "1.2.91", StudyState.FAILED, error="boom")
    _held(database, "1.2.92")
    with database.session() as s:
        add_user(s, "doc", "radiologist", "long enough")
        add_user(s, "root", "admin", "long enough")
        first = s.execute(select(func.max(AuditEntry.seq))).scalar_one()
    assert store.login(database, "doc", "wrong password").user is None
    assert store.login(database, "nobody", "long enough").user is None
    doc = store.login(database, "doc", "long enough", source="10.0.0.1").user
    root = store.login(database, "root", "long enough").user
    assert doc is not None and root is not None
    store.log_event(database, doc.name, AuditAction.STUDY_OPENED, "1.2.90")
    with database.session() as s:
        for decision, lesion in (("accept", 1), ("reject", 2), ("amend", None)):
            store.add_review(
                s,
                study_uid="1.2.90",
                job_id=job,
                lesion_label=lesion,
                decision=decision,
                reason=None if decision == "accept" else "because",
                note=None,
                user=doc,
            )
        store.release_study(s, "1.2.92", "one patient after all", user=doc)
        store.retry_study(s, "1.2.91", user=root)
    store.log_event(database, doc.name, AuditAction.STUDY_OUTPUT_DOWNLOADED, "1.2.90")
    store.log_event(database, root.name, AuditAction.AUDIT_VERIFIED, None, {"ok": True})
    store.log_event(database, root.name, AuditAction.USER_SESSION_EXPIRED)
    store.log_event(database, doc.name, AuditAction.USER_LOGOUT)
    with pytest.raises(TypeError, match="must be an AuditAction"):
        store.log_event(database, doc.name, "user.logged_out")  # type: ignore[arg-type]
    with database.session() as s:
        appended = list(
            s.execute(select(AuditEntry.action).where(AuditEntry.seq > first)).scalars()
        )
    members = {a.value for a in AuditAction}
    assert appended and set(appended) <= members
    assert "user.logged_out" not in appended
    for expected in (
        "user.login_failed",
        "user.login",
        "review.accept",
        "review.reject",
        "review.amend",
        "study.released",
        "study.retry",
        "user.logout",
    ):
        assert expected in appended

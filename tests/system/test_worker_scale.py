"""50 studies queued at once, drained by 2 real worker processes on a real Redis broker with the
node on PostgreSQL: every study DONE, processed exactly once, one set of outputs per study.

The studies are small generated chest CTs (see `tests.helpers.small_chest_ct_studies`): 20
contiguous 5 mm slices from the middle of the lung2 sample, subsampled to 256x256 (1.25 mm
pixels), under new UIDs. They pass the chest-CT selection rules (CT Image Storage, CHEST, at
least 20 slices, at most 5 mm thick) and hold about 2.4 l of lung, so each ends DONE with a SEG
and an SR, in about a second of work each.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from db import OutboxMessage, Study, StudyState, audit
from dicom_node.dispatcher import celery_publisher
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import failures, jobs_and_outputs, small_chest_ct_studies

STUDIES = 50
WORKERS = 2


def _states(db) -> Counter:  # noqa: ANN001
    with db.session() as s:
        return Counter(s.execute(select(Study.state)).scalars())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_fifty_studies_two_workers_no_duplicates(
    database, node_factory, radai_workers, redis_server, samples, tmp_path
):
    studies = small_chest_ct_studies(samples["lung2"], tmp_path / "studies", STUDIES)
    home = tmp_path / "home"
    broker = f"redis://127.0.0.1:{redis_server()}/0"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node = node_factory(
        database, publish=celery_publisher(broker, queue), home=home, stable_seconds=1.0
    )

    # Two senders of 25 studies each; no worker runs yet, so all 50 wait in the queue together.
    uids = list(studies)
    halves = [uids[: STUDIES // 2], uids[STUDIES // 2 :]]
    results: list = [None, None]

    def send(i: int) -> None:
        files = [f for uid in halves[i] for f in studies[uid]]
        results[i] = storescu(node.port, files, aet=f"SCALE{i}", timeout=120)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert all(r is not None and r.returncode == 0 for r in results), results
    wait_for(lambda: _states(database)[StudyState.QUEUED] == STUDIES, timeout=60, interval=0.2)

    env = radai_env(home, database.url, broker, queue)
    started = time.monotonic()
    workers = [radai_workers(env, f"w{n + 1}") for n in range(WORKERS)]
    wait_for(
        lambda: (
            _states(database)[StudyState.DONE] == STUDIES
            or any(w.poll() is not None for w in workers)
            or _states(database)[StudyState.FAILED] + _states(database)[StudyState.NOT_APPLICABLE]
        ),
        timeout=200,
        interval=0.5,
    )
    drained = time.monotonic() - started
    for w in workers:
        assert w.poll() is None, f"a worker exited: {w.log_path.read_text()[-1500:]}"
    assert _states(database) == Counter({StudyState.DONE: STUDIES}), _states(database)

    jobs, outputs = jobs_and_outputs(database)
    # Exactly one job per study, run once (no redelivery), current (not superseded).
    assert len(jobs) == STUDIES
    assert len({j.study_id for j in jobs}) == STUDIES
    assert all(j.state == StudyState.DONE and j.attempts == 1 for j in jobs)
    assert not any(j.superseded for j in jobs)
    # One SEG and one SR per study, each with its own SOP Instance UID and file.
    per_study = Counter((o.study_id, o.modality) for o in outputs)
    assert len(outputs) == 2 * STUDIES
    assert set(per_study.values()) == {1}
    assert {m for _, m in per_study} == {"SEG", "SR"}
    assert len({o.sop_instance_uid for o in outputs}) == len(outputs)
    assert len({o.path for o in outputs}) == len(outputs)
    assert all(Path(o.path).is_file() for o in outputs)
    # Nothing else was written: one job folder per study under outputs/.
    folders = [p for p in (home / "outputs").glob("*/job-*") if p.is_dir()]
    assert len(folders) == STUDIES
    assert sorted(p.name for p in (home / "outputs").rglob("*.dcm")) == sorted(
        ["seg.dcm", "sr.dcm"] * STUDIES
    )

    # Each study was published once; both workers took a share.
    with database.session() as s:
        published = Counter(
            s.execute(
                select(OutboxMessage.study_uid).where(OutboxMessage.published_at.is_not(None))
            ).scalars()
        )
        chain = audit.verify(s)
    assert published == Counter({uid: 1 for uid in uids})
    assert chain.ok, chain
    done = [w.log_path.read_text().count("succeeded in") for w in workers]
    assert sum(done) == STUDIES and min(done) > 0, done
    assert failures(database) == []
    busy = (max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)).total_seconds()
    print(
        f"{STUDIES} studies drained by {WORKERS} workers in {drained:.1f} s from their start, "
        f"{busy:.1f} s from the first job's start to the last job's end "
        f"({STUDIES / busy * 60:.0f} studies/min; split {done})"
    )

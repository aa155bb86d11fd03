"""Dashboard benchmark: server-side time to build the worklist, the study view and the monitoring
page with 10,000 studies in the database, on SQLite and PostgreSQL.

What it measures
----------------
For each database kind a fresh, migrated database is filled with:
- the 61-slice `lung2` sample, sent with dcmtk's `storescu` to an in-process DICOM node and
  processed by the real pipeline (`workers.processing.process_study`: archive files, SEG, SR,
  saliency, findings): the study the study view opens;
- N synthetic studies (`--studies`, default 10,000) spread over 30 days, with realistic rows:
  one series and five instances each, a job per finished study (DONE 80%, FAILED 4%,
  NOT_APPLICABLE 6%; the rest RECEIVING/QUEUED/PROCESSING) with findings shaped like the
  pipeline's (0-4 lesions with measurements and locations), SEG and SR output rows, and reviews
  of about 40% of the finished jobs' lesions (accept 70%, reject 20%, amend 10%).

Each page is then run the way Streamlit runs it, through `streamlit.testing.v1.AppTest` on
`dashboard/app.py` (the whole script: session check, sidebar, the page's queries and its
rendering into Streamlit's messages; no browser), logged in as a radiologist (an admin for
monitoring). `--repeats` runs per row, the median shown, and the min and max beside it:

  worklist          a rerun of the Worklist page (first page of 50, no filter)
  study (cold)      opening the lung2 study with every cache cleared: reads the 61 slices,
                    decodes the SEG and saliency map, composes the slice with overlays
  study (warm)      a rerun of the same study page (volume and overlays cached, as when a
                    reader moves the slice slider)
  study + saliency  the cold study view with the saliency map turned on (read on demand:
                    decompressing it costs more than reading the series)
  monitoring        the Monitoring page, "All time", its cache cleared before each run

Peers measured in the same run, on the same database server:
  peer: 100 studies the same pages on a database with the same recipe but 100 synthetic studies:
                    `ratio` is N studies / 100 studies (what 100x more studies cost)
  SELECT count(*)   the bare count query the worklist also runs, through the same engine: the
                    floor any page that touches the table pays
Also shown: `store.worklist` alone (the queries without Streamlit).

Other agents' and programs' work on the machine stretches wall-clock times, so each row also
gives the CPU time this process spent (`time.process_time`, all threads: the script, SQLite,
image decoding; not PostgreSQL's server process), which contention inflates far less; the load
average is printed before and after.

The goal is under 1 s for the worklist and the study view with 10,000 studies.

Run: `python bench/dashboard.py [--studies N] [--repeats R] [--databases sqlite,postgresql]`
from the repository root with `.venv` active. PostgreSQL at 127.0.0.1:5432 (user postgres,
trust) gets temporary databases, dropped at the end; dcmtk's `/usr/bin/storescu` is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import streamlit as st  # noqa: E402
from sqlalchemy import func, insert, select, text  # noqa: E402
from streamlit import logger as streamlit_logger  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from bench.common import dcmtk_env  # noqa: E402
from dashboard import store  # noqa: E402
from db import Instance, Job, Output, Review, Series, Study, StudyState, User  # noqa: E402
from db.session import Database  # noqa: E402
from db.users import add_user  # noqa: E402
from dicom_node.archive import Archive  # noqa: E402
from dicom_node.samples import build_sample_series, sample_study_uid  # noqa: E402
from dicom_node.server import NodeConfig  # noqa: E402
from dicom_node.service import NodeService  # noqa: E402
from workers import processing  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")
STORESCU = "/usr/bin/storescu"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"
PASSWORD = "bench password"
LUNG2 = sample_study_uid("lung2")
PEER_STUDIES = 100
LOCATIONS = store.LOCATIONS


# --- building a database ----------------------------------------------------------------------


def process_lung2(db: Database, work: Path, files: list[Path]) -> None:
    """lung2 through a real node and the real pipeline, as the dashboard tests build lung1."""
    node = NodeService(
        db,
        Archive(work / "archive", work / "quarantine"),
        NodeConfig(host="127.0.0.1", port=0),
        stable_seconds=0.3,
        publish=lambda task, payload: None,
        poll_seconds=0.1,
        backoff_cap=1.0,
    )
    node.start()
    try:
        sent = subprocess.run(
            [STORESCU, "-aec", "RADAI", "127.0.0.1", str(node.port), *map(str, files)],
            env=dcmtk_env(),
            capture_output=True,
            timeout=300,
        )
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr[-500:]!r}")
        deadline = time.monotonic() + 60
        while True:
            with db.session() as s:
                state = s.execute(
                    select(Study.state).where(Study.study_uid == LUNG2)
                ).scalar_one_or_none()
            if state == StudyState.QUEUED:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"lung2 never became QUEUED (state {state})")
            time.sleep(0.1)
    finally:
        node.stop()
    outcome = processing.process_study(db, LUNG2, work / "outputs")
    if outcome != StudyState.DONE:
        raise SystemExit(f"lung2 was not processed: {outcome}")


def _findings(rng: random.Random, lesions: int) -> dict:
    items = []
    for label in range(1, lesions + 1):
        d3 = round(rng.uniform(4, 35), 1)
        items.append(
            {
                "label": label,
                "volume_mm3": round(0.3 * d3**3, 1),
                "max_3d_diameter_mm": d3,
                "max_2d_axial_diameter_mm": round(d3 * rng.uniform(0.7, 1.0), 1),
                "mean_hu": round(rng.uniform(-300, 80), 1),
                "location": rng.choice(LOCATIONS),
                "centroid_zyx": [rng.randint(5, 250), rng.uniform(100, 400), rng.uniform(80, 430)],
                "slice_index": rng.randint(5, 250),
            }
        )
    return {
        "screening_probability": round(rng.random(), 3),
        "priority": rng.randint(1, 5),
        "lung_volume_ml": round(rng.uniform(3500, 7000), 1),
        "series_uid": "",
        "lesions": items,
    }


def fill(db: Database, n: int, seed: int = 7) -> None:
    """N synthetic studies (see the module docstring) with bulk inserts, ids given explicitly."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    with db.session() as s:
        reader = s.execute(select(User.id).where(User.name == "bench_reader")).scalar_one()
        base = {
            t: (s.execute(select(func.max(t.id))).scalar_one() or 0) + 1
            for t in (Study, Series, Instance, Job, Output, Review)
        }
    studies, series, instances, jobs, outputs, reviews = [], [], [], [], [], []
    for i in range(n):
        sid = base[Study] + i
        uid = f"2.25.{uuid.UUID(int=rng.getrandbits(128)).int}"
        received = now - timedelta(minutes=rng.uniform(0, 30 * 24 * 60))
        roll = rng.random()
        state = (
            StudyState.DONE
            if roll < 0.80
            else StudyState.FAILED
            if roll < 0.84
            else StudyState.NOT_APPLICABLE
            if roll < 0.90
            else rng.choice([StudyState.RECEIVING, StudyState.QUEUED, StudyState.PROCESSING])
        )
        findings = _findings(rng, rng.choice([0, 0, 1, 1, 2, 3, 4])) if state == "DONE" else None
        error = {
            StudyState.FAILED: "pixel data undecodable: JPEG 2000 decoder missing",
            StudyState.NOT_APPLICABLE: rng.choice(["modality MR is not CT", "no axial series"]),
        }.get(state)
        studies.append(
            {
                "id": sid,
                "study_uid": uid,
                "state": state,
                "patient_id": f"P{rng.randint(10**6, 10**7)}",
                "patient_name": f"SYNTH^PATIENT{i}",
                "accession_number": f"A{i:08d}",
                "study_date": received.strftime("%Y%m%d"),
                "study_description": "CT CHEST",
                "modalities": "CT",
                "priority": findings["priority"] if findings else None,
                "flagged": rng.random() < 0.01,
                "instance_count": 5,
                "first_received_at": received,
                "last_instance_at": received + timedelta(seconds=20),
                "state_changed_at": received + timedelta(minutes=1),
                "error": error,
                "attempts": 1,
            }
        )
        series_id = base[Series] + i
        series.append(
            {
                "id": series_id,
                "study_id": sid,
                "series_uid": f"{uid}.1",
                "modality": "CT",
                "series_number": 1,
                "instance_count": 5,
            }
        )
        for k in range(5):
            instances.append(
                {
                    "id": base[Instance] + i * 5 + k,
                    "study_id": sid,
                    "series_id": series_id,
                    "sop_instance_uid": f"{uid}.1.{k}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                    "instance_number": k + 1,
                    "archive_path": f"/nonexistent/{uid}/{k}.dcm",
                    "sha256": "0" * 64,
                    "size": 525_000,
                    "transfer_syntax": "1.2.840.10008.1.2.1",
                    "calling_ae": "BENCH",
                    "received_at": received,
                }
            )
        if state not in (StudyState.DONE, StudyState.FAILED, StudyState.NOT_APPLICABLE):
            continue
        job_id = base[Job] + len(jobs)
        finished = min(now, received + timedelta(seconds=rng.uniform(8, 90)))
        jobs.append(
            {
                "id": job_id,
                "study_id": sid,
                "pipeline": processing.PIPELINE,
                "pipeline_version": processing.PIPELINE_VERSION,
                "input_hash": f"{i:064d}",
                "state": state,
                "attempts": 1,
                "error": error,
                "findings": findings,
                "model_versions": {"radai-classical-baseline": "0.1.0"},
                "superseded": False,
                "created_at": received + timedelta(seconds=6),
                "started_at": received + timedelta(seconds=6),
                "finished_at": finished,
                "timings": {"total": 4.0},
            }
        )
        if not findings:
            continue
        for modality in ("SEG", "SR"):
            outputs.append(
                {
                    "id": base[Output] + len(outputs),
                    "job_id": job_id,
                    "study_id": sid,
                    "modality": modality,
                    "path": f"/nonexistent/{uid}/{modality.lower()}.dcm",
                    "sop_instance_uid": f"{uid}.9.{modality == 'SR'}",
                    "series_uid": f"{uid}.9",
                    "sha256": "0" * 64,
                    "created_at": finished,
                }
            )
        if rng.random() < 0.4:
            at = min(now, finished + timedelta(minutes=rng.expovariate(1 / 240)))
            for les in findings["lesions"] or [None]:
                decision = rng.choices(["accept", "reject", "amend"], [7, 2, 1])[0]
                reviews.append(
                    {
                        "id": base[Review] + len(reviews),
                        "study_id": sid,
                        "job_id": job_id,
                        "lesion_label": les["label"] if les else None,
                        "decision": decision,
                        "reason": None if decision == "accept" else "bench",
                        "user_id": reader,
                        "created_at": at,
                        "model_name": "radai-classical-baseline",
                        "model_version": "0.1.0",
                    }
                )
    with db.session() as s:
        for model, rows in (
            (Study, studies),
            (Series, series),
            (Instance, instances),
            (Job, jobs),
            (Output, outputs),
            (Review, reviews),
        ):
            for start in range(0, len(rows), 5000):
                s.execute(insert(model), rows[start : start + 5000])
        if not db.is_sqlite:
            # Explicit ids leave the sequences behind; the app's own inserts must not collide.
            for model in (Study, Series, Instance, Job, Output, Review):
                table = model.__tablename__
                s.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")


# --- measuring ---------------------------------------------------------------------------------


def _logged_in(url: str, name: str) -> AppTest:
    os.environ["RADAI_DATABASE_URL"] = url
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(PASSWORD)
    at = at.form_submit_button[0].click().run()
    if at.exception or not at.session_state["user"]:
        raise SystemExit(f"login failed: {at.exception}")
    return at


@dataclass
class Sample:
    """Seconds per run: wall clock, and CPU of this process (all its threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _timed(
    run: Callable[[], object], repeats: int, before: Callable[[], None] | None = None
) -> Sample:
    sample = Sample()
    for _ in range(repeats):
        if before:
            before()
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        sample.wall.append(time.perf_counter() - t0)
        sample.cpu.append(time.process_time() - c0)
    return sample


def _checked(at: AppTest) -> AppTest:
    if at.exception:
        raise SystemExit(f"the page raised: {at.exception[0].value}")
    return at


def measure(url: str, repeats: int) -> dict[str, Sample]:
    db = Database(url)
    out: dict[str, Sample] = {}
    try:
        with db.session() as s:
            total = s.execute(select(func.count()).select_from(Study)).scalar_one()

        def count() -> None:
            with db.session() as s:
                s.execute(text("SELECT count(*) FROM studies")).scalar_one()

        count()
        out["SELECT count(*)"] = _timed(count, repeats)

        def worklist_queries() -> None:
            with db.session() as s:
                page = store.worklist(s, page_size=50)
            assert page.total == total and len(page.rows) == min(50, total)

        worklist_queries()
        out["store.worklist (queries only)"] = _timed(worklist_queries, repeats)

        at = _logged_in(url, "bench_reader")
        shown = at.dataframe[0].value
        if len(shown) != min(50, total):
            raise SystemExit(f"the worklist shows {len(shown)} rows")
        out["worklist page"] = _timed(lambda: _checked(at.run()), repeats)

        at.session_state["study_uid"] = LUNG2
        at.session_state["page"] = "Study"

        def open_study() -> None:
            _checked(at.run())
            if len(at.image) != 1 or "Lesion 1" not in [c.label for c in at.checkbox]:
                raise SystemExit("the study view shows no image with its SEG overlay")

        # Clears the app's volume/SEG/saliency caches (and its engine cache: a new pool, which
        # is part of a cold start too).
        out["study view (cold)"] = _timed(open_study, repeats, before=st.cache_resource.clear)
        out["study view (warm)"] = _timed(open_study, repeats)

        def saliency_cold() -> None:
            st.cache_resource.clear()
            at.session_state["saliency_on"] = True

        out["study + saliency (cold)"] = _timed(open_study, repeats, before=saliency_cold)
        at.session_state["saliency_on"] = False

        admin = _logged_in(url, "bench_admin")
        admin.session_state["page"] = "Monitoring"
        _checked(admin.run())
        admin.selectbox(key="m_period").set_value("All time")
        _checked(admin.run())
        models = admin.dataframe[0].value
        if int(models["Jobs"].sum()) < total * 0.9 * 0.9:
            raise SystemExit("the monitoring page misses jobs")
        out["monitoring page"] = _timed(
            lambda: _checked(admin.run()), repeats, before=st.cache_data.clear
        )
    finally:
        db.dispose()
    return out


def build(kind: str, n: int, work: Path, lung2: list[Path]) -> tuple[str, Callable[[], None]]:
    """A migrated database of `kind` with lung2 processed and n synthetic studies."""
    if kind == "sqlite":
        url = f"sqlite:///{work / f'bench-{n}.sqlite'}"

        def drop() -> None:
            pass
    else:
        name = f"radai_bench_dash_{os.getpid()}_{n}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{PG_URL}/{name}"

        def drop() -> None:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    db = Database(url)
    try:
        db.upgrade()
        with db.session() as s:
            add_user(s, "bench_reader", "radiologist", PASSWORD, actor="bench")
            add_user(s, "bench_admin", "admin", PASSWORD, actor="bench")
        t0 = time.perf_counter()
        process_lung2(db, work / f"{kind}-{n}", lung2)
        t1 = time.perf_counter()
        fill(db, n)
        print(
            f"  {kind}: lung2 processed in {t1 - t0:.1f} s, {n} studies filled in "
            f"{time.perf_counter() - t1:.1f} s",
            flush=True,
        )
    except BaseException:
        db.dispose()
        drop()
        raise
    db.dispose()
    return url, drop


def _fmt(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"{statistics.median(ms):.1f} ({min(ms):.0f}-{max(ms):.0f})"


def _med(times: list[float]) -> float:
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--databases", default="sqlite,postgresql")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # AppTest outside a server: Streamlit notes "missing ScriptRunContext" and "No runtime
    # found" on every run, which would bury the table.
    streamlit_logger.set_log_level("error")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("streamlit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    print(
        f"{platform.node()} · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()}"
        f" · load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    results: dict[str, dict[int, dict[str, Sample]]] = {}
    with tempfile.TemporaryDirectory(prefix="radai-bench-dash-") as tmp:
        work = Path(tmp)
        lung2 = build_sample_series("lung2", work / "samples")
        drops: list[Callable[[], None]] = []
        try:
            for kind in args.databases.split(","):
                results[kind] = {}
                for n in (args.studies, PEER_STUDIES):
                    url, drop = build(kind, n, work, lung2)
                    drops.append(drop)
                    results[kind][n] = measure(url, args.repeats)
        finally:
            for drop in drops:
                drop()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"Server-side ms: wall median (min-max) of {args.repeats}, and the CPU this process "
        f"used (median); {args.studies} studies against the {PEER_STUDIES}-study peer "
        "(ratio = N / peer, wall and CPU) and against a bare SELECT count(*) (wall)."
    )
    n, p = args.studies, PEER_STUDIES
    for kind, by_n in results.items():
        big, peer = by_n[n], by_n[p]
        floor = _med(big["SELECT count(*)"].wall)
        print(f"\n{kind}\n")
        print(
            f"| page | {n} wall | {n} CPU | {p} wall | {p} CPU | ratio wall | ratio CPU "
            "| x count(*) |"
        )
        print("|---|--:|--:|--:|--:|--:|--:|--:|")
        for row, sample in big.items():
            other = peer[row]
            print(
                f"| {row} | {_fmt(sample.wall)} | {_med(sample.cpu) * 1000:.1f} "
                f"| {_fmt(other.wall)} | {_med(other.cpu) * 1000:.1f} "
                f"| {_med(sample.wall) / _med(other.wall):.2f} "
                f"| {_med(sample.cpu) / max(_med(other.cpu), 1e-6):.2f} "
                f"| {_med(sample.wall) / floor:.0f} |"
            )


if __name__ == "__main__":
    main()

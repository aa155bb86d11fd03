"""Does the node's ingest rate stay flat as its archive grows? 0 to --instances recorded.

One fresh `radai node` on SQLite (its default) or PostgreSQL receives --instances 64x64 CT
instances (about 9 KB each, where the fixed cost per instance sets the rate) in chunks of
--chunk, each chunk one dcmtk `storescu` association of new studies. Between chunks the next
chunk's files are written (not timed; the node is idle then). Per chunk it prints: the rate,
the node's CPU per instance (utime + stime from /proc), and its resident memory afterwards.
Flat means the last chunk's rate and CPU per instance are within noise of the first's; the
closing line gives last/first for both. At the end the node must hold every instance
(`radai studies --json`), or the run is reported FAILED.

    python bench/ingest_scale.py                          # SQLite, 100,000 instances
    python bench/ingest_scale.py --db postgresql --instances 30000
    python bench/ingest_scale.py --instances 20000 --chunk 5000

PostgreSQL: a database `radai_bench_scale` is created on --pg (default the local server's
`postgresql://postgres@127.0.0.1:5432/test` connection, trust auth) and dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HOST, Processes, free_port, proc_cpu_seconds, proc_status_kb
from common import storescu as kit_storescu
from ingest import _RADAI_EXE, build_samples, build_small_corpus, wait_for_echo

AET = "RADAI"
PG_DB = "radai_bench_scale"


def _pg_admin(url: str, sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="radai-bench-scale-"))
    procs = Processes()
    db_url = f"sqlite:///{work / 'home' / 'radai.sqlite'}"
    if args.db == "postgresql":
        _pg_admin(args.pg, f"DROP DATABASE IF EXISTS {PG_DB}")
        _pg_admin(args.pg, f"CREATE DATABASE {PG_DB}")
        db_url = args.pg.rsplit("/", 1)[0] + f"/{PG_DB}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(
        RADAI_HOME=str(work / "home"),
        RADAI_DATABASE_URL=db_url,
        RADAI_DICOM_HOST=HOST,
        RADAI_DICOM_PORT=str(port),
        RADAI_AE_TITLE=AET,
        RADAI_STABLE_SECONDS="5",
    )
    failed = False
    rows: list[tuple[int, float, float, float]] = []
    try:
        lung2 = build_samples(work / "samples")
        node = procs.start([str(_RADAI_EXE), "node"], env=env, log=work / "node.log")
        wait_for_echo(node, AET, port)
        print(f"radai node on {args.db}; {args.instances} instances in chunks of {args.chunk}")
        print(f"{'recorded before':>15} {'inst/s':>8} {'CPU ms/inst':>12} {'RSS MB':>8}")
        sent = 0
        chunk_no = 0
        while sent < args.instances:
            n = min(args.chunk, args.instances - sent)
            folder = work / f"chunk{chunk_no}"
            files = build_small_corpus(lung2, folder, n, name=f"scale{chunk_no}-")
            cpu0, t0 = proc_cpu_seconds(node.pid), time.perf_counter()
            result = kit_storescu(
                port, files, aec=AET, aet="SCALE", timeout=3600, verbose=False,
                capture_stdout=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            cpu = proc_cpu_seconds(node.pid) - cpu0
            shutil.rmtree(folder, ignore_errors=True)
            if result.returncode != 0:
                print(f"FAILED: storescu exited {result.returncode} in chunk {chunk_no}")
                failed = True
                break
            rows.append(
                (sent, n / seconds, 1000 * cpu / n, (proc_status_kb(node.pid, "VmRSS") or 0) / 1024)
            )
            print(f"{sent:>15} {rows[-1][1]:>8.1f} {rows[-1][2]:>12.2f} {rows[-1][3]:>8.1f}")
            sent += n
            chunk_no += 1
        if not failed:
            listing = subprocess.run(
                [str(_RADAI_EXE), "studies", "--json"],
                env=env, capture_output=True, text=True, check=True, timeout=600,
            )  # fmt: skip
            held = sum(int(s["instances"]) for s in json.loads(listing.stdout))
            if held != args.instances:
                print(f"FAILED: the node holds {held} of {args.instances} instances")
                failed = True
        if rows and not failed:
            first, last = rows[0], rows[-1]
            print(
                f"last/first chunk: rate {last[1] / first[1]:.2f}x, "
                f"CPU per instance {last[2] / first[2]:.2f}x, "
                f"RSS {first[3]:.0f} -> {last[3]:.0f} MB"
            )
    finally:
        procs.stop_all()
        if args.db == "postgresql":
            try:
                _pg_admin(args.pg, f"DROP DATABASE IF EXISTS {PG_DB}")
            except Exception as exc:  # noqa: BLE001 - report, the temp folder still goes
                print(f"could not drop {PG_DB}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

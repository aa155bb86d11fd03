"""DICOMweb benchmark: radai's DICOMweb next to Orthanc's DICOMweb plugin, on the same data in the
same run, both queried by the same clients (dicomweb-client, the ImagingDataCommons library, for
QIDO and STOW; plain HTTP for WADO, counting the bytes).

What it measures
----------------
Both servers get the same instances, sent by dcmtk `storescu` processes (`--senders` concurrent
associations per server, each one a folder sent with `+sd +r`): `--studies` small studies (one
series of two 64x64 CT slices each: the studies searched) and one big study of two series of
`--slices` 512x512 16-bit slices (the series retrieved). The small studies differ in what QIDO
matches on: study k has Patient ID `P%05d`, name `DOE^P%05d`, accession `A%07d`, a study date k
days after 2000-01-01, institution `HOSPITAL %02d` (k mod 100), and every hundredth one is MR
instead of CT. Then each row is run
`--repeats` times on each server, the two servers taking turns, and the median (min-max) wall
seconds, the server process's CPU seconds (median, from /proc) and the ratio radai/Orthanc of
the medians are printed, with the number of results (or MB) each answered:

  QIDO all studies, limit 100    search_for_studies(limit=100): a worklist's first page
  QIDO all studies, limit 1000   the largest page either gives
  QIDO by PatientID              one study
  QIDO by AccessionNumber        one study
  QIDO by PatientName wildcard   DOE^P0012*: ten studies
  QIDO by StudyDate range        about 1 % of the studies (a range of days)
  QIDO by ModalitiesInStudy      MR: 1 % of the studies
  QIDO by InstitutionName *      HOSPITAL 07: 1 % of the studies, on an attribute that is not a
                                 standard QIDO key (radai reads one header per study for it; so
                                 did every key but UIDs, Patient ID, accession number and study
                                 date before migration 0010)
  QIDO series of a study         search_for_series(big study): 2 series
  QIDO instances of a series     search_for_instances(big study, series): `--slices` instances
  WADO series                    GET .../series/{uid}, multipart as stored; MB/s
  WADO series as JPEG-LS         the same asked for in JPEG-LS Lossless (1.2.840.10008.1.2.4.80)
  WADO series as RLE             and in RLE Lossless (1.2.840.10008.1.2.5): transcoded by the
                                 server (Orthanc 1.10's plugin answers RLE with 500)
  WADO study                     GET .../studies/{uid}: both big series; MB/s
  WADO metadata                  GET .../series/{uid}/metadata (DICOM JSON)
  WADO frame                     one frame of one slice
  STOW 10 instances              store_instances of 10 new 64x64 slices (radai: fsync and index
                                 each, as its C-STORE does; Orthanc: its own storage)

radai: `radai node` (the venv's, with this checkout's code first on PYTHONPATH) in a temp
RADAI_HOME (SQLite database, embedded broker, RADAI_STABLE_SECONDS=86400 so nothing is
dispatched), DICOMweb on a free loopback port, and a worker token. Orthanc: the Debian package
with its DICOMweb plugin, authentication off, started fresh in a temp dir. Only 127.0.0.1 is
used; both are stopped and their folders removed. Before the timed rows each server answers one
of each query untimed (a warm page cache and warm database on both); the first of these is
timed apart: radai's first search after instances arrived indexes what its background indexer
has not yet (`dicomweb/index.py`, `server.py`: one header per new series, read once).

A row a server refuses shows its HTTP status instead of times (Orthanc 1.10's plugin 1.7
answers dicomweb-client's frame request with 400).

Run: `python bench/dicomweb.py [--studies 200] [--slices 61] [--repeats 5] [--senders 2]` from
the repository root with `.venv` active (`--studies 10000` for the issue's archive size: about
20,000 instances, a few minutes to build and send). Needs dcmtk's `/usr/bin/storescu`,
`/usr/sbin/Orthanc` and its plugin `/usr/share/orthanc/plugins/libOrthancDicomWeb.so`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
from common import (  # noqa: E402
    STORESCU,
    BenchRun,
    Processes,
    bench_token,
    dcmtk_env,
    free_port,
    problems,
    proc_cpu_seconds,
    report_log_problems,
)
from dicomweb_client.api import DICOMwebClient  # noqa: E402
from e2e import Service  # noqa: E402
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid  # noqa: E402

from db.session import Database  # noqa: E402
from tests.kit.dicomweb import ct_instance, save  # noqa: E402
from tests.kit.net import HOST  # noqa: E402
from tests.kit.orthanc import OrthancServer, orthanc_executable  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FIRST_DAY = date(2000, 1, 1)
MR_EVERY = 100
TIMEOUT = 600  # s a request may take (dicomweb-client's default, 20, is too short for some)
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _accept_syntax(uid: str) -> str:
    """The Accept header asking for a series transcoded into ``uid`` (PS3.18 8.7.3)."""
    return f'multipart/related; type="application/dicom"; transfer-syntax={uid}'


# Corpus -------------------------------------------------------------------------------------


@dataclass
class Corpus:
    folders: list[Path]  # one per sender; every instance is in exactly one
    instances: int
    big_study: str
    big_series: list[str]
    big_sop: str
    big_bytes: dict[str, int]  # file bytes per big series
    studies: int


def _day(n: int) -> str:
    return (FIRST_DAY + timedelta(days=n)).strftime("%Y%m%d")


def build_corpus(folder: Path, studies: int, slices: int, senders: int) -> Corpus:
    folders = [folder / f"sender{i}" for i in range(senders)]
    big_study = generate_uid()
    big_series = [generate_uid(), generate_uid()]
    big_bytes: dict[str, int] = {}
    big_sop = ""
    count = 0
    for k, series in enumerate(big_series):
        big_bytes[series] = 0
        for n in range(slices):
            ds = ct_instance(
                big_study, series, number=n + 1, size=512, series_number=k + 1, patient_id="BIG"
            )
            path = save(ds, folders[n % senders] / "big")
            big_bytes[series] += path.stat().st_size
            big_sop = big_sop or str(ds.SOPInstanceUID)
            count += 1
    for n in range(studies):
        study, series = generate_uid(), generate_uid()
        for k in (1, 2):
            ds = ct_instance(
                study,
                series,
                number=k,
                size=64,
                patient_id=f"P{n:05d}",
                patient_name=f"DOE^P{n:05d}",
                accession=f"A{n:07d}",
                study_date=_day(n),
            )
            ds.InstitutionName = f"HOSPITAL {n % 100:02d}"
            if n % MR_EVERY == 7:
                ds.Modality = "MR"
            save(ds, folders[n % senders] / f"{n // 1000:03d}")
            count += 1
    return Corpus(folders, count, big_study, big_series, big_sop, big_bytes, studies)


def send(corpus: Corpus, aec: str, port: int) -> tuple[float, list[str]]:
    """Each sender folder over its own storescu association, all at once; seconds and problems."""

    def one(folder: Path) -> subprocess.CompletedProcess:
        argv = [STORESCU, "-aet", "BENCH", "-aec", aec, "+sd", "+r", HOST, str(port), str(folder)]
        return subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dcmtk_env()
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(corpus.folders)) as pool:
        results = list(pool.map(one, corpus.folders))
    seconds = time.perf_counter() - t0
    said: list[str] = []
    for r in results:
        if r.returncode != 0:
            said.append(f"storescu exited {r.returncode}")
        said += problems(r.stderr)[:5]
    return seconds, said


# Timing -------------------------------------------------------------------------------------


@dataclass
class Row:
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # the server process's CPU seconds
    result: object = None  # results counted, MB retrieved, or "HTTP nnn"
    mb: float = 0.0  # bytes of the answer, for MB/s


@dataclass
class Server:
    name: str
    pid: int
    qido: DICOMwebClient
    http: requests.Session
    root: str  # the DICOMweb root URL
    rows: dict[str, Row] = field(default_factory=dict)


def _run(server: Server, name: str, fn: Callable[[Server], object]) -> None:
    row = server.rows.setdefault(name, Row())
    if row.walls and math.isnan(row.walls[0]):
        return  # refused or timed out once: not asked again
    c, w = proc_cpu_seconds(server.pid), time.perf_counter()
    try:
        result = fn(server)
    except requests.RequestException as exc:
        status = getattr(exc.response, "status_code", None)
        row.result = f"HTTP {status}" if status else type(exc).__name__
        row.walls, row.cpus = [math.nan], [math.nan]
        return
    row.walls.append(time.perf_counter() - w)
    row.cpus.append(proc_cpu_seconds(server.pid) - c)
    if isinstance(result, tuple):  # (what to show, bytes)
        row.result, nbytes = result
        row.mb = nbytes / 1e6
    else:
        row.result = result


def _get_bytes(server: Server, path: str, accept: str) -> int:
    with server.http.get(server.root + path, headers={"Accept": accept}, stream=True) as rsp:
        rsp.raise_for_status()
        return sum(len(chunk) for chunk in rsp.iter_content(1 << 20))


def queries(corpus: Corpus) -> dict[str, Callable[[Server], object]]:
    n = corpus.studies
    probe = min(7, n - 1)
    span = max(1, n // 100)
    low = n // 2
    date_range = f"{_day(low)}-{_day(min(low + span - 1, n - 1))}"
    study, (series, series2) = corpus.big_study, corpus.big_series

    def studies(**kw: object) -> Callable[[Server], object]:
        return lambda s: len(s.qido.search_for_studies(**kw))  # type: ignore[arg-type]

    def wado(path: str, accept: str = WADO_ACCEPT) -> Callable[[Server], object]:
        def fetch(s: Server) -> tuple[str, int]:
            size = _get_bytes(s, path, accept)
            return f"{size / 1e6:.1f} MB", size

        return fetch

    def stow(s: Server) -> int:
        st, se = generate_uid(), generate_uid()
        s.qido.store_instances([ct_instance(st, se, number=k, size=64) for k in range(10)])
        return 10

    sop = corpus.big_sop
    return {
        "QIDO all studies, limit 100": studies(limit=100),
        "QIDO all studies, limit 1000": studies(limit=1000),
        "QIDO by PatientID": studies(search_filters={"PatientID": f"P{probe:05d}"}),
        "QIDO by AccessionNumber": studies(search_filters={"AccessionNumber": f"A{probe:07d}"}),
        "QIDO by PatientName wildcard": studies(
            search_filters={"PatientName": f"DOE^P{probe // 10:04d}*"}
        ),
        "QIDO by StudyDate range": studies(search_filters={"StudyDate": date_range}),
        "QIDO by ModalitiesInStudy": studies(search_filters={"ModalitiesInStudy": "MR"}),
        "QIDO by InstitutionName *": studies(
            search_filters={"InstitutionName": f"HOSPITAL {probe:02d}"}
        ),
        "QIDO series of a study": lambda s: len(s.qido.search_for_series(study)),
        "QIDO instances of a series": lambda s: len(s.qido.search_for_instances(study, series)),
        "WADO series": wado(f"/studies/{study}/series/{series2}"),
        "WADO series as JPEG-LS": wado(
            f"/studies/{study}/series/{series2}", _accept_syntax(JPEGLSLossless)
        ),
        "WADO series as RLE": wado(
            f"/studies/{study}/series/{series2}", _accept_syntax(RLELossless)
        ),
        "WADO study": wado(f"/studies/{study}"),
        "WADO metadata": lambda s: len(s.qido.retrieve_series_metadata(study, series)),
        "WADO frame": lambda s: len(
            s.qido.retrieve_instance_frames(study, series, sop, frame_numbers=[1])[0]
        ),
        "STOW 10 instances": stow,
    }


# Servers ------------------------------------------------------------------------------------


def radai_count(home: Path) -> int:
    db = Database(f"sqlite:///{home / 'radai.sqlite'}")
    try:
        with db.session() as s:
            from sqlalchemy import func, select

            from db.models import Instance

            return int(s.execute(select(func.count(Instance.id))).scalar_one())
    finally:
        db.dispose()


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


def print_table(radai: Server, orthanc: Server, repeats: int) -> None:
    print(f"\n{repeats} runs each, servers taking turns; median (min-max) wall seconds, median")
    print("server CPU seconds; ratio = radai / Orthanc median wall; n = results (radai/Orthanc)")
    head = f"{'':30} {'radai wall':>24} {'cpu':>6} {'orthanc wall':>24} {'cpu':>6} {'ratio':>6}  n"
    print(head)
    print("-" * len(head))
    for name, r in radai.rows.items():
        o = orthanc.rows[name]
        ratio = statistics.median(r.walls) / statistics.median(o.walls)
        line = (
            f"{name:30} {fmt(r.walls):>24} {statistics.median(r.cpus):6.3f} "
            f"{fmt(o.walls):>24} {statistics.median(o.cpus):6.3f} {ratio:6.2f}  "
            f"{r.result}/{o.result}"
        )
        same = r.result == o.result or (r.mb and o.mb and abs(r.mb / o.mb - 1) < 0.01)
        if not same:
            line += "  (not the same answer: not comparable)"
        elif r.mb and o.mb:
            line += (
                f"  ({r.mb / statistics.median(r.walls):.0f} / "
                f"{o.mb / statistics.median(o.walls):.0f} MB/s)"
            )
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=200, help="small studies (default 200)")
    parser.add_argument("--slices", type=int, default=61, help="slices of each big series")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--senders", type=int, default=2, help="storescu processes per server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir, print it")
    args = parser.parse_args()
    if not os.access(STORESCU, os.X_OK) or not Path(PLUGIN).exists():
        print(f"needs {STORESCU} (dcmtk) and {PLUGIN} (orthanc-dicomweb)", file=sys.stderr)
        return 2
    orthanc_executable()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="radai-bench-dicomweb-"))
    procs = Processes()
    with BenchRun(work, procs, keep=args.keep) as run:
        t0 = time.perf_counter()
        corpus = build_corpus(work / "corpus", args.studies, args.slices, args.senders)
        print(f"corpus: {corpus.instances} instances ({args.studies} small studies, 2 series of "
              f"{args.slices} 512x512 slices) built in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
        svc = Service(work / "radai", procs, "", "radai.bench.dicomweb", 86400)
        web_port = free_port()
        svc.extra_env.update(
            RADAI_DICOMWEB_HOST=HOST,
            RADAI_DICOMWEB_PORT=str(web_port),
            RADAI_AUDIT_KEY_FILE=str(svc.home / "audit.key"),
            RADAI_MIN_FREE_DISK_MB="0",
        )
        svc.start_node()
        assert svc.node is not None
        token = bench_token(svc.home)
        with OrthancServer(dicomweb=True) as orthanc:
            assert orthanc._proc is not None
            receivers = [("radai", "RADAI", svc.port), ("orthanc", orthanc.aet, orthanc.dicom_port)]
            for label, aec, port in receivers:
                seconds, said = send(corpus, aec, port)
                held = (
                    radai_count(svc.home)
                    if label == "radai"
                    else int(orthanc.get("/statistics")["CountInstances"])  # type: ignore[index]
                )
                print(f"sent to {label}: {held} of {corpus.instances} held, {seconds:.0f} s "
                      f"({corpus.instances / seconds:.0f} instances/s, {args.senders} storescu), "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
                for p in said:
                    print(f"  {label} storescu: {p}")
                if held != corpus.instances:
                    raise RuntimeError(f"{label} holds {held} of {corpus.instances} instances")
            radai_root = f"http://{HOST}:{web_port}/dicomweb"
            auth = {"Authorization": f"Bearer {token}"}
            r_http = requests.Session()
            r_http.headers.update(auth)
            servers = [
                Server(
                    "radai",
                    svc.node.pid,
                    DICOMwebClient(url=radai_root, headers=auth, timeout=TIMEOUT),
                    r_http,
                    radai_root,
                ),
                Server(
                    "orthanc",
                    orthanc._proc.pid,
                    DICOMwebClient(url=orthanc.dicomweb_url, timeout=TIMEOUT),
                    requests.Session(),
                    orthanc.dicomweb_url,
                ),
            ]
            rows = queries(corpus)
            first = {}
            for server in servers:  # untimed: warm caches on both
                for name, fn in rows.items():
                    if not name.startswith("STOW"):
                        _run(server, name, fn)
                first[server.name] = next(iter(server.rows.values())).walls[0]
                server.rows.clear()
            # radai indexes what arrived since its last search in the first one (one header per
            # new series): here all of the corpus.
            print(
                f"first search after the send ({next(iter(rows))}): radai "
                f"{first['radai']:.2f} s, Orthanc {first['orthanc']:.2f} s",
                flush=True,
            )
            for name, fn in rows.items():
                for k in range(args.repeats):
                    for server in servers if k % 2 == 0 else servers[::-1]:
                        _run(server, name, fn)
                print(f"  {name}: done, load {os.getloadavg()[0]:.2f}", flush=True)
            print_table(servers[0], servers[1], args.repeats)
        print(f"load {os.getloadavg()[0]:.2f}")
        report_log_problems(svc.log_problems(), "radai log lines at WARNING or worse")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""DICOMweb benchmark: radai's DICOMweb next to Orthanc's DICOMweb plugin, on the same data in the
same run, both queried by the same client (dicomweb-client, the ImagingDataCommons library).

What it measures
----------------
Both servers get the same instances over C-STORE: one CT series of `--slices` 512x512 16-bit
slices (the series retrieved) and `--studies` small studies of two 64x64 slices (the studies
searched). Then, `--repeats` times each, median (min-max) wall seconds and this process's CPU
seconds (radai runs in this process, so its CPU column includes the server's work; Orthanc's
does not: compare wall times):

  QIDO all studies        search_for_studies() (at most 1000 a page on both)
  QIDO by PatientID       search_for_studies(PatientID=...) matching one study
  QIDO series instances   search_for_instances(study, series) of the big series
  WADO series             retrieve_series of the big series (as stored: Explicit VR LE)
  WADO series as JPEG-LS  the same, asked for in JPEG-LS Lossless (1.2.840.10008.1.2.4.80) and
  WADO series as RLE      RLE Lossless (1.2.840.10008.1.2.5): transcoded by the server (the
                          last column shows the syntaxes that came back)
  WADO metadata           retrieve_series_metadata of the big series
  WADO frame              retrieve_instance_frames, frame 1 of one slice
  STOW 10 instances       store_instances of 10 new 64x64 slices (radai: fsync and index each,
                          as its C-STORE does; Orthanc: its own storage)

radai: an in-process node (SQLite, no broker) with its DICOMweb on a free loopback port and a
worker token. Orthanc: the Debian package with its DICOMweb plugin, authentication off, started
fresh in a temp dir. Only 127.0.0.1 is used; both are stopped and their folders removed.

A row a server refuses shows its HTTP status instead of times (Orthanc 1.10's plugin 1.7
answers dicomweb-client's frame request with 400).

Run: `python bench/dicomweb.py [--slices 61] [--studies 200] [--repeats 5]` from the repository
root with `.venv` active. Needs `/usr/sbin/Orthanc` and its plugin
`/usr/share/orthanc/plugins/libOrthancDicomWeb.so`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
from dicomweb_client.api import DICOMwebClient  # noqa: E402
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid  # noqa: E402

from db import audit  # noqa: E402
from db.api_tokens import create_token  # noqa: E402
from db.audit_keys import AuditKeys  # noqa: E402
from db.session import Database  # noqa: E402
from db.users import add_user  # noqa: E402
from dicom_io.cstore import send_files  # noqa: E402
from dicom_node.archive import Archive  # noqa: E402
from dicom_node.server import NodeConfig  # noqa: E402
from dicom_node.service import NodeService  # noqa: E402
from tests.kit.dicomweb import ct_instance, dicomweb_server, save  # noqa: E402
from tests.kit.net import HOST  # noqa: E402
from tests.kit.orthanc import OrthancServer  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def corpus(folder: Path, slices: int, studies: int) -> tuple[list[Path], str, str, str]:
    study, series = generate_uid(), generate_uid()
    files = [
        save(ct_instance(study, series, number=n + 1, size=512), folder / "big")
        for n in range(slices)
    ]
    for n in range(studies):
        s, se = generate_uid(), generate_uid()
        for k in (1, 2):
            ds = ct_instance(s, se, number=k, size=64, patient_id=f"P{n:05d}")
            files.append(save(ds, folder / f"s{n:05d}"))
    return files, study, series, files[0].stem


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of each run and the last result (an HTTP status when it failed)."""
    walls: list[float] = []
    cpus: list[float] = []
    result: object = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        try:
            result = fn()
        except requests.HTTPError as exc:
            return [math.nan], [math.nan], f"HTTP {exc.response.status_code}"
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return walls, cpus, result


def _syntaxes(datasets: list) -> str:
    """How many instances came back and in which transfer syntaxes (a server that ignores the
    syntax asked for shows it here)."""
    names = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets})
    return f"{len(datasets)} in {'+'.join(n.removeprefix('1.2.840.10008.1.2') for n in names)}"


def run_all(client: DICOMwebClient, study: str, series: str, sop: str, repeats: int) -> dict:
    rows: dict[str, tuple[list[float], list[float], object]] = {}
    rows["QIDO all studies"] = timed(lambda: len(client.search_for_studies()), repeats)
    rows["QIDO by PatientID"] = timed(
        lambda: len(client.search_for_studies(search_filters={"PatientID": "P00007"})), repeats
    )
    rows["QIDO series instances"] = timed(
        lambda: len(client.search_for_instances(study, series)), repeats
    )
    rows["WADO series"] = timed(lambda: len(client.retrieve_series(study, series)), repeats)
    for label, ts in (("JPEG-LS", JPEGLSLossless), ("RLE", RLELossless)):
        rows[f"WADO series as {label}"] = timed(
            lambda ts=ts: _syntaxes(
                client.retrieve_series(study, series, media_types=(("application/dicom", ts),))
            ),
            repeats,
        )
    rows["WADO metadata"] = timed(
        lambda: len(client.retrieve_series_metadata(study, series)), repeats
    )
    rows["WADO frame"] = timed(
        lambda: len(client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])[0]),
        repeats,
    )

    def stow() -> int:
        s, se = generate_uid(), generate_uid()
        client.store_instances([ct_instance(s, se, number=k, size=64) for k in range(10)])
        return 10

    rows["STOW 10 instances"] = timed(stow, repeats)
    return rows


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=61)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="radai-bench-dicomweb-") as tmp:
        home = Path(tmp)
        audit.configure(AuditKeys.load(home / "audit.key"))
        files, study, series, sop = corpus(home / "corpus", args.slices, args.studies)
        db = Database(f"sqlite:///{home / 'radai.sqlite'}")
        db.upgrade()
        with db.session() as s:
            add_user(s, "bench", "admin", "bench-password", actor="bench")
            token = create_token(s, "bench", role="worker", actor="bench")[1]
        node = NodeService(
            db,
            Archive(home / "archive", home / "quarantine"),
            NodeConfig(host=HOST, port=0, min_free_disk_mb=0),
            stable_seconds=3600,
            publish=lambda task, payload: None,
        )
        node.start()
        config = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        try:
            with dicomweb_server(db, node.node.store) as web, OrthancServer(**config) as orthanc:
                send_files(files, ("RADAI", HOST, node.port), calling_aet="BENCH")
                send_files(files, orthanc.destination, calling_aet="BENCH")
                radai = DICOMwebClient(
                    url=f"http://{HOST}:{web.port}/dicomweb",
                    headers={"Authorization": f"Bearer {token}"},
                )
                peer = DICOMwebClient(url=f"{orthanc.http_url}/dicom-web")
                results = {
                    "radai": run_all(radai, study, series, sop, args.repeats),
                    "orthanc": run_all(peer, study, series, sop, args.repeats),
                }
        finally:
            node.stop()
            db.dispose()
    print(f"{len(files)} instances on each; {args.repeats} runs, median (min-max) seconds")
    print(f"{'':24} {'radai wall':>24} {'radai cpu':>9} {'orthanc wall':>24} {'ratio':>6}  n")
    for name in results["radai"]:
        rw, rc, rn = results["radai"][name]
        ow, _, on = results["orthanc"][name]
        ratio = statistics.median(rw) / statistics.median(ow)
        print(f"{name:24} {fmt(rw):>24} {statistics.median(rc):9.3f} {fmt(ow):>24} "
              f"{ratio:6.2f}  {rn}/{on}")  # fmt: skip
    print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

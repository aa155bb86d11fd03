"""What a remote worker pays to read its series over DICOMweb (`dicom_io/archive.py`), next to
reading the same files from local disk as a worker beside the node does.

Orthanc with its DICOMweb plugin holds lung2 (61 CT slices, 512x512); for each of N runs:
  local   the 61 files read from disk and loaded into a volume (`load_series`), the peer;
  cold    the series fetched by WADO-RS into an empty cache, then loaded;
  warm    the same series from the cache (each file's SHA-256 checked), then loaded.
Also the time to STOW-RS two of the slices back (about 1 MB). Medians are printed.

    python bench/archive.py            # 5 runs
    python bench/archive.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from dicom_io.archive import ArchiveClient, ArchiveSettings, SeriesCache  # noqa: E402
from dicom_io.series import load_series  # noqa: E402
from dicom_node.samples import build_sample_studies, sample_study_uid  # noqa: E402
from tests.kit.orthanc import OrthancServer  # noqa: E402
from tests.system.test_remote_worker import upload  # noqa: E402


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="radai-bench-archive-") as tmp:
        files = build_sample_studies(Path(tmp) / "samples")["lung2"]
        study = sample_study_uid("lung2")
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        series = str(first.SeriesInstanceUID)
        sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        mb = sum(f.stat().st_size for f in files) / 1e6
        with OrthancServer(dicomweb=True) as orthanc:
            upload(orthanc, files)
            times: dict[str, list[float]] = {"local": [], "cold": [], "warm": [], "stow": []}
            for run in range(args.runs):
                cache_root = Path(tmp) / f"cache-{run}"
                client = ArchiveClient(
                    ArchiveSettings(orthanc.dicomweb_url), SeriesCache(cache_root, 1 << 30)
                )

                def via_archive(c: ArchiveClient = client) -> None:
                    paths = c.series_files(study, series, sops)
                    load_series([paths[s] for s in sops])

                times["local"].append(_timed(lambda: load_series(files)))
                times["cold"].append(_timed(via_archive))
                times["warm"].append(_timed(via_archive))
                small = [pydicom.dcmread(files[0]), pydicom.dcmread(files[1])]
                times["stow"].append(_timed(lambda c=client, d=small: c.store(d)))
    print(f"lung2: {len(files)} instances, {mb:.1f} MB; median of {args.runs} runs")
    for name, values in times.items():
        print(f"  {name:6s} {statistics.median(values) * 1000:8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

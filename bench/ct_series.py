"""Clinical-size CT series for the benchmarks, built from a real chest CT.

The sample CTs are 5 mm studies (lung2: 61 slices of 512 x 512); scanners send 0.6-1 mm slices,
so a real study holds 300-600 slices. This writes a real CT's anatomy at such a slice count:
`lung2` from the shared data folder (`/work/shared/data/pyradiomics-ct`, the same file as the
bundled sample) is written as a DICOM series at its own resolution, then resampled along z
(linear interpolation between neighbouring slices, same field of view, same in-plane grid) to
the asked number of slices or slice spacing. Headers are the demo sample's (synthetic, marked
DEMO) with new deterministic Study/Series/SOP Instance UIDs per size, so each size is its own
study. Benchmarks only: the tests may not read the shared data (they use tests/kit/phantoms.py).

    python bench/ct_series.py OUT --slices 534        # ~0.56 mm slices of lung2
    python bench/ct_series.py OUT --slice-mm 0.625    # 489 slices
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.samples import build_sample_series  # noqa: E402

SHARED = Path("/work/shared/data/pyradiomics-ct")
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "samples"
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radai:bench:ct_series:v1")


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NS, '/'.join(map(str, parts))).int}"


def _ds(value: float) -> str:
    text = f"{float(value):.10g}"
    return "0" if text == "-0" else text


def _source_dir() -> Path:
    return SHARED if (SHARED / "lung2_image.nrrd").exists() else BUNDLED


def write_resampled(
    out_dir: Path,
    *,
    slices: int | None = None,
    slice_mm: float | None = None,
    case: str = "lung2",
) -> list[Path]:
    """Write `case` resampled along z into `out_dir` (one file per slice); returns the paths in
    slice order. Exactly one of `slices` (count over the same z extent) or `slice_mm`."""
    if (slices is None) == (slice_mm is None):
        raise ValueError("give slices or slice_mm")
    with tempfile.TemporaryDirectory() as tmp:
        native = build_sample_series(case, Path(tmp), samples_dir=_source_dir())
        headers = [pydicom.dcmread(p) for p in native]
        stored = np.stack([ds.pixel_array for ds in headers]).astype(np.float32)
    template = headers[0]
    first, last = headers[0], headers[-1]
    p0 = np.asarray(first.ImagePositionPatient, dtype=float)
    p1 = np.asarray(last.ImagePositionPatient, dtype=float)
    length = float(np.linalg.norm(p1 - p0))
    n = int(slices) if slices is not None else int(round(length / float(slice_mm))) + 1
    if n < 2:
        raise ValueError("at least two slices")
    step = length / (n - 1)
    # Position of each new slice in units of the source's slice index.
    where = np.linspace(0.0, len(headers) - 1, n)
    tag = f"{case}-{n}"
    study_uid, series_uid = _uid(tag, "study"), _uid(tag, "series")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, w in enumerate(where):
        lo = min(int(np.floor(w)), len(headers) - 2)
        t = w - lo
        pixels = np.rint((1 - t) * stored[lo] + t * stored[lo + 1]).astype("<u2")
        ds = template
        sop = _uid(tag, "instance", k + 1)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = _uid(tag, "frame")
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.AccessionNumber = f"BENCH{n}"
        ds.StudyID = f"BENCH{n}"
        ds.SeriesDescription = f"DEMO axial chest resampled to {n} slices"
        position = p0 + (p1 - p0) * (k / (n - 1))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position[2]))
        ds.SliceThickness = _ds(step)
        ds.SpacingBetweenSlices = _ds(step)
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--slices", type=int)
    group.add_argument("--slice-mm", type=float)
    args = parser.parse_args(argv)
    paths = write_resampled(args.out, slices=args.slices, slice_mm=args.slice_mm)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    print(f"{len(paths)} slices of {ds.Rows} x {ds.Columns}, {ds.SliceThickness} mm, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loading a CT series into a volume in Hounsfield units, with its geometry: the one loader of
the pipeline and the viewer, so that a finding's slice index is the viewer's slice index.

Slices are ordered by their position along the slice normal (never by file name, instance number
or the caller's order); the series is refused with a plain reason when it cannot form one regular
volume: objects without pixels, mixed sizes or orientations, duplicate positions, missing slices
or uneven spacing. Pixel data that cannot be decoded is a different failure (`UndecodablePixels`).
Reasons name files by their archive name (a content hash), never by anything about the patient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import DTypeLike
from pydicom.dataset import Dataset


class SeriesError(Exception):
    """The series cannot be loaded; the reason is meant for people."""


class UnusableSeries(SeriesError):
    """The series cannot be analysed as one volume; the reason is meant for people."""


class UndecodablePixels(SeriesError):
    """Pixel data present but not decodable (unsupported or corrupt compression)."""


@dataclass
class Volume:
    hu: np.ndarray  # (z, y, x), of the dtype asked for (float32 by default)
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]  # patient coordinates of the first voxel
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    datasets: list[Dataset]  # headers in volume order (pixel data released)
    paths: list[Path]

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """In volume order: index i of the first axis is the instance named here at i."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)


def _float_list(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise UnusableSeries(f"{path.name}: {keyword} missing or malformed")
    return np.asarray([float(v) for v in value], dtype=float)


def load_series(
    paths: Sequence[str | os.PathLike[str]],
    *,
    spacing_tolerance: float = 0.1,
    dtype: DTypeLike = np.float32,
) -> Volume:
    """Read, check and stack a series' files (in any order) into a HU volume.

    An integer ``dtype`` (the viewer keeps int16 to halve its memory) clips to its range."""
    if not paths:
        raise UnusableSeries("the series holds no instances")
    dtype = np.dtype(dtype)
    limits = np.iinfo(dtype) if dtype.kind in "iu" else None
    headers = []
    for path in map(Path, paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - the archive holds only checked files, but still
            raise UnusableSeries(f"{path.name} cannot be read: {exc}") from None
        headers.append((path, ds))

    without_pixels = [p.name for p, ds in headers if "Rows" not in ds or "Columns" not in ds]
    if without_pixels:
        raise UnusableSeries(
            f"{len(without_pixels)} object(s) in the series are not images "
            f"(e.g. {without_pixels[0]})"
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(sizes) > 1:
        raise UnusableSeries(f"images of different sizes in one series: {sorted(sizes)}")

    orientation = _float_list(headers[0][1], "ImageOrientationPatient", 6, headers[0][0])
    for path, ds in headers[1:]:
        other = _float_list(ds, "ImageOrientationPatient", 6, path)
        if not np.allclose(other, orientation, atol=1e-3):
            raise UnusableSeries("slices have different orientations")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = [
        (float(np.dot(_float_list(ds, "ImagePositionPatient", 3, p), normal)), p, ds)
        for p, ds in headers
    ]
    positions.sort(key=lambda t: t[0])
    z = np.array([t[0] for t in positions])
    if len(z) > 1:
        steps = np.diff(z)
        if np.any(steps < 1e-3):
            raise UnusableSeries("two or more slices share the same position")
        typical = float(np.median(steps))
        worst = int(np.argmax(np.abs(steps - typical)))
        if abs(steps[worst] - typical) > spacing_tolerance * typical:
            raise UnusableSeries(
                f"slice spacing is irregular: {steps[worst]:.2f} mm between slices {worst + 1} "
                f"and {worst + 2}, {typical:.2f} mm elsewhere (missing slices?)"
            )
        dz = typical
    else:
        dz = float(headers[0][1].get("SliceThickness") or 1.0)

    first = positions[0][2]
    spacing = first.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise UnusableSeries("PixelSpacing missing")
    dy, dx = float(spacing[0]), float(spacing[1])

    rows, cols = sizes.pop()
    hu = np.empty((len(positions), rows, cols), dtype=dtype)
    for i, (_, path, _header) in enumerate(positions):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - codecs raise many kinds
            raise UndecodablePixels(f"{path.name}: pixel data cannot be decoded: {exc}") from None
        if pixels.shape != (rows, cols):
            raise UnusableSeries(f"{path.name}: pixel array {pixels.shape} is not one 2D slice")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = pixels.astype(np.float32) * slope + intercept
        hu[i] = values if limits is None else np.clip(values, limits.min, limits.max)

    origin = _float_list(first, "ImagePositionPatient", 3, positions[0][1])
    return Volume(
        hu=hu,
        spacing_zyx=(dz, dy, dx),
        origin_xyz=tuple(origin),
        row_cosine=tuple(row),
        column_cosine=tuple(col),
        datasets=[t[2] for t in positions],
        paths=[t[1] for t in positions],
    )

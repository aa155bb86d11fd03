"""The worker and the viewer load a series through one loader: for a series handed over shuffled,
reversed, acquired feet first, or broken (a missing slice, an object without pixels), both give
the same slices in the same order, or both refuse it for the same reason. A finding's
`slice_index` from the worker is therefore the viewer's slice."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dashboard import imaging
from tests.helpers import copy_files
from workers import processing

Builder = Callable[[list[Path], Path], list[Path]]


def _rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def shuffled(files: list[Path], tmp_path: Path) -> list[Path]:
    order = list(files)
    random.Random(7).shuffle(order)
    return order


def reversed_order(files: list[Path], tmp_path: Path) -> list[Path]:
    return list(reversed(files))


def instance_numbers_backwards(files: list[Path], tmp_path: Path) -> list[Path]:
    copies = copy_files(files[:12], tmp_path)
    for number, path in zip(range(len(copies), 0, -1), copies, strict=True):
        _rewrite(path, lambda ds, n=number: setattr(ds, "InstanceNumber", n))
    return shuffled(copies, tmp_path)


def feet_first(files: list[Path], tmp_path: Path) -> list[Path]:
    # Positions mirrored along z: the file that was the lowest slice is now the highest.
    copies = copy_files(files[:12], tmp_path)
    for path in copies:

        def mirror(ds: pydicom.Dataset) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, -z]

        _rewrite(path, mirror)
    return shuffled(copies, tmp_path)


def normal_pointing_down(files: list[Path], tmp_path: Path) -> list[Path]:
    # Columns run towards anterior: the slice normal is -z, so volume order is head to feet.
    copies = copy_files(files[:12], tmp_path)
    for path in copies:
        _rewrite(path, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, -1, 0]))
    return copies


def missing_slice(files: list[Path], tmp_path: Path) -> list[Path]:
    return shuffled(files[:20] + files[21:], tmp_path)


def object_without_pixels(files: list[Path], tmp_path: Path) -> list[Path]:
    copies = copy_files(files[:8], tmp_path)

    def strip(ds: pydicom.Dataset) -> None:
        for keyword in ("Rows", "Columns", "PixelData"):
            delattr(ds, keyword)

    _rewrite(copies[3], strip)
    return copies


def _worker(paths: list[Path]) -> tuple[str, object]:
    # The name the pipeline calls, so that a loader of its own in workers would be caught here.
    try:
        volume = processing.load_series(paths)
    except processing.UnusableSeries as exc:
        return "refused", str(exc)
    return "loaded", (volume.sop_instance_uids, volume.hu, volume.datasets)


def _viewer(paths: list[Path]) -> tuple[str, object]:
    try:
        volume = imaging.load_ct(tuple(str(p) for p in paths))
    except imaging.ImagingError as exc:
        return "refused", str(exc)
    return "loaded", (volume.sop_instance_uids, volume.hu)


@pytest.mark.parametrize(
    "build",
    [shuffled, reversed_order, instance_numbers_backwards, feet_first, normal_pointing_down],
)
def test_worker_and_viewer_give_the_same_slices_in_the_same_order(
    samples: dict[str, list[Path]], tmp_path: Path, build: Builder
) -> None:
    paths = build(samples["lung1"], tmp_path)
    worker, viewer = _worker(paths), _viewer(paths)
    assert worker[0] == viewer[0] == "loaded"
    uids, hu, headers = worker[1]
    viewer_uids, viewer_hu = viewer[1]
    assert viewer_uids == uids and len(uids) == len(paths)
    assert viewer_hu.dtype == np.int16 and np.array_equal(viewer_hu, hu)
    # And the order is by position along the slice normal, whatever the caller's order.
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = [
        float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)) for ds in headers
    ]
    assert along == sorted(along) and len(set(along)) == len(along)


@pytest.mark.parametrize(
    ("build", "reason"),
    [(missing_slice, "missing slices"), (object_without_pixels, "not images")],
)
def test_worker_and_viewer_refuse_the_same_broken_series(
    samples: dict[str, list[Path]], tmp_path: Path, build: Builder, reason: str
) -> None:
    paths = build(samples["lung1"], tmp_path)
    worker, viewer = _worker(paths), _viewer(paths)
    assert worker[0] == viewer[0] == "refused"
    assert worker[1] == viewer[1] and reason in worker[1]


def test_viewer_clips_to_int16_and_keeps_the_volume_read_only(
    samples: dict[str, list[Path]], tmp_path: Path
) -> None:
    copies = copy_files(samples["lung1"][:3], tmp_path)
    # A slope that puts bright pixels far beyond int16: clipped, not wrapped around to negative.
    _rewrite(copies[1], lambda ds: setattr(ds, "RescaleSlope", "100"))
    volume = imaging.load_ct(tuple(str(p) for p in copies))
    middle = volume.sop_instance_uids.index(str(pydicom.dcmread(copies[1]).SOPInstanceUID))
    worker = processing.load_series(copies).hu[middle]
    assert (worker > 32767).any()
    assert np.array_equal(volume.hu[middle], np.clip(worker, -32768, 32767).astype(np.int16))
    assert not volume.hu.flags.writeable

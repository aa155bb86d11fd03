"""Small synthetic chest backgrounds and nodule crops for the compositor and augmentation tests
(the tests never read the real data folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.data.nodules import NoduleCrop, NoduleRow
from ml.data.synth import Background

PHANTOM_SPACING = (2.0, 1.0, 1.0)


def _ellipsoid(shape, spacing, centre_mm, radii_mm) -> np.ndarray:
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s - c for n, s, c in zip(shape, spacing, centre_mm, strict=True)],
        indexing="ij",
    )
    return sum((g / r) ** 2 for g, r in zip(grids, radii_mm, strict=True)) <= 1.0


def phantom_background(
    seed: int = 0, spacing=PHANTOM_SPACING, shape=(64, 96, 96), name: str = "phantom"
) -> Background:
    """A body (40 HU) with two air lungs (-850 HU, noise 25 HU) and bright vessels along z."""
    rng = np.random.default_rng(seed)
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    zc, yc, xc = (e / 2 for e in extent)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = _ellipsoid(shape, spacing, (zc, yc, xc), (extent[0], 0.45 * extent[1], 0.47 * extent[2]))
    hu[body] = 40.0
    lung = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lung |= _ellipsoid(
            shape,
            spacing,
            (zc, yc, xc + side * 0.22 * extent[2]),
            (0.4 * extent[0], 0.33 * extent[1], 0.16 * extent[2]),
        )
    hu[lung] = -850.0
    # Vessels: tubes of 1.2 mm radius along z through the lungs.
    yy, xx = np.meshgrid(
        (np.arange(shape[1]) + 0.5) * spacing[1],
        (np.arange(shape[2]) + 0.5) * spacing[2],
        indexing="ij",
    )
    for vy, vx in ((yc - 10, xc - 22), (yc + 12, xc + 20), (yc + 2, xc + 24)):
        tube = (yy - vy) ** 2 + (xx - vx) ** 2 <= 1.2**2
        hu[:, tube] = np.where(lung[:, tube], 50.0, hu[:, tube])
    hu += rng.normal(0.0, 25.0, size=shape).astype(np.float32)
    return Background(name, hu, lung, tuple(float(s) for s in spacing), np.zeros(shape, bool))


def phantom_crop(
    radii_mm=(6.0, 5.0, 5.0),
    spacing=(2.5, 0.7, 0.7),
    shape=(12, 44, 44),
    seed: int = 0,
    patient_id: str = "LIDC-IDRI-9999",
    wall: bool = True,
) -> NoduleCrop:
    """A solid ellipsoidal nodule (30 HU) in parenchyma (-800 HU) with, in one corner, a piece of
    the source scan's chest wall (60 HU) that must never be pasted."""
    rng = np.random.default_rng(seed)
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    mask = _ellipsoid(shape, spacing, [e / 2 for e in extent], radii_mm)
    hu = np.full(shape, -800.0, dtype=np.float32)
    hu[mask] = 30.0
    if wall:
        hu[:, :8, :] = 60.0
    hu += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    row = NoduleRow(patient_id, 1, 2.0 * float(np.mean(radii_mm)), {})
    return NoduleCrop(row, hu, mask, tuple(float(s) for s in spacing), f"test/{row.crop_name}")


def write_phantom_crop(
    folder: Path,
    patient_id: str,
    nodule: int,
    radius_mm: float,
    spacing=(2.5, 0.7, 0.7),
    shape=(12, 44, 44),
    hu_value: float | None = None,
) -> None:
    """A :func:`phantom_crop` (no wall; the nodule at ``hu_value`` if given) written as the LIDC
    crop files `image/` and `mask/` under ``folder``."""
    import SimpleITK as sitk

    crop = phantom_crop(
        (radius_mm,) * 3, spacing, shape, seed=nodule, patient_id=patient_id, wall=False
    )
    hu = crop.hu if hu_value is None else np.where(crop.mask, hu_value, crop.hu)
    for sub, arr in (("image", hu.astype(np.int16)), ("mask", crop.mask.astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(spacing)[::-1])
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / sub / f"{patient_id}_R_{nodule}.nii.gz"))


def blob_chest(seed: int = 0, spacing=(2.5, 1.2, 1.2), shape=(48, 112, 112)) -> Background:
    """:func:`phantom_background` with 40 small dense blobs in the lungs, so that a registration
    has structure to follow in every direction (the vessels run along z only); lungs ~380 ml,
    above the registration's minimum."""
    bg = phantom_background(seed, spacing=spacing, shape=shape)
    rng = np.random.default_rng(seed)
    hu = bg.hu.copy()
    sp = np.asarray(spacing, dtype=float)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp, strict=True)], indexing="ij")
    lung_voxels = np.argwhere(bg.lung)
    for c in lung_voxels[rng.choice(len(lung_voxels), 40, replace=False)] * sp:
        r = rng.uniform(1.5, 3.0)
        blob = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= r * r
        hu[blob & bg.lung] = 40.0
    return Background(bg.name, hu, bg.lung, bg.spacing, bg.tumour)


def chest_ct_phantom(
    slices: int = 200, size: int = 256, spacing=(1.5, 1.2, 1.2), seed: int = 0
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A chest-sized (z, y, x) float32 HU volume built a slice at a time, so that building a
    large one costs no more than the volume itself: a body (40 HU) with two air lungs (-850 HU)
    and, in the right lung, a solid 16 mm nodule (40 HU); noise 20 HU. For memory tests of the
    worker's stages at clinical sizes (the real CTs are for the benchmarks only)."""
    rng = np.random.default_rng(seed)
    dz, dy, dx = spacing
    length = slices * dz
    yy, xx = np.meshgrid((np.arange(size) + 0.5) * dy, (np.arange(size) + 0.5) * dx, indexing="ij")
    yc, xc = size * dy / 2, size * dx / 2
    body = ((yy - yc) / (0.42 * size * dy)) ** 2 + ((xx - xc) / (0.46 * size * dx)) ** 2 <= 1
    nodule_zyx = (0.5 * length, yc, xc - 0.2 * size * dx)
    hu = np.empty((slices, size, size), dtype=np.float32)
    for z in range(slices):
        zmm = (z + 0.5) * dz
        plane = np.where(body, 40.0, -1000.0).astype(np.float32)
        reach = 1 - ((zmm - 0.5 * length) / (0.42 * length)) ** 2
        if reach > 0:
            for side in (-1, 1):
                lung = ((yy - yc) / (0.3 * size * dy)) ** 2 + (
                    (xx - xc - side * 0.2 * size * dx) / (0.14 * size * dx)
                ) ** 2 <= reach
                plane[lung] = -850.0
        nodule = (yy - nodule_zyx[1]) ** 2 + (xx - nodule_zyx[2]) ** 2 + (
            zmm - nodule_zyx[0]
        ) ** 2 <= 8.0**2
        plane[nodule] = 40.0
        plane += rng.normal(0.0, 20.0, size=plane.shape).astype(np.float32)
        hu[z] = plane
    return hu, (float(dz), float(dy), float(dx))


def ct_headers(shape: tuple[int, int, int], spacing) -> list:
    """Single-frame CT Image Storage headers (no pixel data) for a (z, y, x) volume, in volume
    order: what the SEG and SR writers need of a series."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = "Test^Phantom", "RADAI-TEST-PHANTOM"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "1015", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, i + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "synthetic", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, i * float(spacing[0])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        out.append(ds)
    return out

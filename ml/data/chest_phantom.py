"""Synthetic chest CT pairs with known correspondence, for testing and evaluating follow-up.

A phantom chest (elliptic body, spine, two air lungs with vessel tubes, spherical solid nodules) is
drawn twice: as the prior, and as a follow-up whose anatomy is the prior's seen through a known
smooth mapping (a breathing-like displacement that grows towards the diaphragm, plus a shift of
the patient on the table), with nodules regrown by known factors, some resolved and some new, and
independent noise. Everything about the pair is known: the mapping of every point, the nodule
correspondence and the true (analytic) nodule volumes. Edges are drawn with partial volume from
the signed distance, and a nodule's label is the voxels at least half inside it, so a label's voxel
volume estimates the true volume without bias. Imports `ml.image` only (nothing at all, for now).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Breathing", "NoduleSpec", "PhantomPair", "phantom_pair", "render_chest"]

BODY_HU = 30.0
LUNG_HU = -850.0
VESSEL_HU = 40.0
BONE_HU = 500.0
NODULE_HU = 40.0
AIR_HU = -1000.0


@dataclass(frozen=True)
class Breathing:
    """The mapping from follow-up (current) points to prior points, (z, y, x) mm: a shift, plus a
    cranio-caudal displacement of up to ``amplitude_mm`` that rises smoothly from the lung apices
    (``z_apex_mm``) to the diaphragm (``z_base_mm``), and an antero-posterior expansion of up to
    ``expansion_mm`` growing the same way, both fading towards the body's sides."""

    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    amplitude_mm: float = 0.0
    expansion_mm: float = 0.0
    z_apex_mm: float = 0.0
    z_base_mm: float = 1.0
    centre_yx_mm: tuple[float, float] = (0.0, 0.0)
    width_mm: float = 100.0

    def __call__(self, points_zyx: np.ndarray) -> np.ndarray:
        p = np.asarray(points_zyx, dtype=np.float64)
        z, y, x = p[..., 0], p[..., 1], p[..., 2]
        t = np.clip((z - self.z_apex_mm) / (self.z_base_mm - self.z_apex_mm), 0.0, 1.0)
        s = t * t * (3.0 - 2.0 * t)
        fade = np.exp(-(((x - self.centre_yx_mm[1]) / self.width_mm) ** 2))
        out = p + np.asarray(self.shift_mm)
        out[..., 0] += self.amplitude_mm * s * fade
        out[..., 1] += self.expansion_mm * s * fade * (y - self.centre_yx_mm[0]) / self.width_mm
        return out


@dataclass(frozen=True)
class NoduleSpec:
    """A nodule at ``centre_mm`` (follow-up frame, (z, y, x)) with its diameters in the prior and
    the follow-up; 0 means absent (a new nodule has prior 0, a resolved one current 0)."""

    centre_mm: tuple[float, float, float]
    prior_diameter_mm: float
    current_diameter_mm: float


@dataclass
class PhantomPair:
    """A prior/follow-up pair with its truth. Labels number nodules from 1 in the order of
    ``nodules``; a label absent from one study is a nodule absent from it. ``spacing`` is the
    follow-up's, ``prior_spacing`` the prior's (both grids have origin 0). ``mapping`` maps
    follow-up points to prior points; ``landmarks_current`` (random points inside the lungs, then
    the nodule centres in ``nodules`` order) and their images ``landmarks_prior`` measure
    registration error."""

    prior: np.ndarray
    current: np.ndarray
    prior_labels: np.ndarray
    current_labels: np.ndarray
    spacing: tuple[float, float, float]
    prior_spacing: tuple[float, float, float]
    nodules: list[NoduleSpec]
    mapping: Breathing
    landmarks_current: np.ndarray
    landmarks_prior: np.ndarray
    interval_days: float

    def prior_centre(self, i: int) -> np.ndarray:
        return self.mapping(np.asarray(self.nodules[i].centre_mm))

    @staticmethod
    def sphere_volume(diameter_mm: float) -> float:
        return math.pi * diameter_mm**3 / 6.0


def _ellipsoid_sd(p: np.ndarray, centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    r = np.sqrt(sum(((p[..., i] - centre[i]) / axes[i]) ** 2 for i in range(len(axes))))
    return (r - 1.0) * min(axes)


def _segment_sd(p: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(p - closest, axis=-1) - radius


def _cover(sd: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel from the signed distance of its centre."""
    return np.clip(0.5 - sd / voxel_mm, 0.0, 1.0)


@dataclass(frozen=True)
class _Anatomy:
    """The reference phantom's geometry in mm (z, y, x), from the grid's extent."""

    extent: np.ndarray
    centre: tuple[float, float, float]
    body_axes: tuple[float, float]
    lungs: list[tuple[float, float, float]]
    lung_axes: tuple[float, float, float]
    vessels: list[tuple[np.ndarray, np.ndarray, float]]
    spine_yx: tuple[float, float]
    spine_radius: float


def _anatomy(shape: Sequence[int], spacing: Sequence[float]) -> _Anatomy:
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    cz, cy, cx = (float(v) for v in extent / 2.0)
    lung_axes = (0.36 * extent[0], 0.25 * extent[1], 0.15 * extent[2])
    lungs = [(cz, cy - 0.02 * extent[1], cx + side * 0.19 * extent[2]) for side in (-1, 1)]
    rng = np.random.default_rng(7)
    vessels = []
    for lung in lungs:
        outward = float(np.sign(lung[2] - cx))
        hilum = np.array([lung[0], lung[1], lung[2] - outward * 0.5 * lung_axes[2]])
        for _ in range(7):
            direction = rng.normal(size=3)
            direction[2] = outward * abs(direction[2]) + outward
            direction /= np.linalg.norm(direction)
            tip = hilum + direction * rng.uniform(0.5, 0.85) * np.asarray(lung_axes) * 1.6
            # Keep tips inside the lung: shrink towards its centre if needed.
            for _ in range(10):
                r = float(np.sqrt(sum(((tip[i] - lung[i]) / lung_axes[i]) ** 2 for i in range(3))))
                if r < 0.85:
                    break
                tip = np.asarray(lung) + (tip - np.asarray(lung)) * 0.85
            vessels.append((hilum, tip, float(rng.uniform(1.5, 2.5))))
    return _Anatomy(
        extent=extent,
        centre=(cz, cy, cx),
        body_axes=(0.40 * extent[1], 0.46 * extent[2]),
        lungs=[tuple(float(v) for v in lung) for lung in lungs],  # type: ignore[misc]
        lung_axes=tuple(float(v) for v in lung_axes),  # type: ignore[arg-type]
        vessels=vessels,
        spine_yx=(cy + 0.30 * float(extent[1]), cx),
        spine_radius=0.06 * float(extent[2]),
    )


def render_chest(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    mapping: Breathing | None = None,
    nodules: Sequence[tuple[Sequence[float], float]] = (),
    noise_hu: float = 0.0,
    seed: int = 0,
    with_lungs: bool = True,
    reference: tuple[Sequence[int], Sequence[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The phantom chest (HU, float32) and its nodule labels (uint8, 1.. in ``nodules`` order).

    The anatomy is the reference phantom's seen through ``mapping`` (voxel centre x shows the
    anatomy at ``mapping(x)``); ``nodules`` are (centre mm, diameter mm) drawn in this frame,
    diameter 0 drawing nothing. ``with_lungs=False`` gives a chest-sized body without any air (an
    abdomen, for refusal tests). The anatomy is sized to ``reference`` (shape, spacing), by default
    this grid, so a study on another grid shows the same anatomy."""
    shape = tuple(int(n) for n in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    a = _anatomy(*(reference or (shape, spacing)))
    grid = np.stack(
        np.meshgrid(
            *[(np.arange(n) + 0.0) * s for n, s in zip(shape, spacing_arr, strict=True)],
            indexing="ij",
        ),
        axis=-1,
    )
    p = grid if mapping is None else mapping(grid)
    voxel = float(spacing_arr.min())
    _, cy, cx = a.centre
    body = _cover(_ellipsoid_sd(p[..., 1:], (cy, cx), a.body_axes), voxel)
    vol = AIR_HU + (BODY_HU - AIR_HU) * body
    if with_lungs:
        lung = np.zeros(shape, dtype=np.float64)
        for centre in a.lungs:
            lung = np.maximum(lung, _cover(_ellipsoid_sd(p, centre, a.lung_axes), voxel))
        vol += (LUNG_HU - BODY_HU) * lung
        vessel = np.zeros(shape, dtype=np.float64)
        for start, end, radius in a.vessels:
            vessel = np.maximum(vessel, _cover(_segment_sd(p, start, end, radius), voxel))
        vol += (VESSEL_HU - vol) * vessel * lung
    sy, sx = a.spine_yx
    spine = _cover(np.hypot(p[..., 1] - sy, p[..., 2] - sx) - a.spine_radius, voxel)
    vol += (BONE_HU - vol) * spine
    labels = np.zeros(shape, dtype=np.uint8)
    for i, (nodule_centre, diameter) in enumerate(nodules, start=1):
        if diameter <= 0:
            continue
        sd = np.linalg.norm(grid - np.asarray(nodule_centre), axis=-1) - diameter / 2.0
        vol += (NODULE_HU - vol) * _cover(sd, voxel)
        labels[sd <= 0] = i
    if noise_hu > 0:
        vol += np.random.default_rng(seed).normal(0.0, noise_hu, size=shape)
    return vol.astype(np.float32), labels


def lung_point(
    shape: Sequence[int], spacing: Sequence[float], side: int, fz: float, fy: float, fx: float
) -> tuple[float, float, float]:
    """A point of the reference phantom's lung ``side`` (0 right of the image, 1 left) at
    fractions (-1..1) of its semi-axes from its centre."""
    a = _anatomy(shape, spacing)
    centre = a.lungs[side]
    axes = a.lung_axes
    return (centre[0] + fz * axes[0], centre[1] + fy * axes[1], centre[2] + fx * axes[2])


def phantom_pair(
    *,
    shape: Sequence[int] = (64, 144, 144),
    spacing: Sequence[float] = (2.0, 1.25, 1.25),
    nodules: Sequence[NoduleSpec] | None = None,
    shift_mm: tuple[float, float, float] = (4.0, -3.0, 2.5),
    amplitude_mm: float = 7.0,
    expansion_mm: float = 3.0,
    noise_hu: float = 20.0,
    landmarks: int = 40,
    interval_days: float = 180.0,
    seed: int = 0,
    prior_shape: Sequence[int] | None = None,
    prior_spacing: Sequence[float] | None = None,
) -> PhantomPair:
    """A prior and follow-up phantom with known mapping, nodule correspondence and volumes.

    By default: one nodule that grows (6 mm -> 7.5 mm), two about stable (9 -> 9.5 mm, 12 mm),
    one that shrinks (8 -> 6.5 mm), one resolved (5 mm) and one new (7 mm). The prior is on the
    follow-up's grid unless ``prior_shape`` and ``prior_spacing`` give it its own (same origin)."""
    shape = tuple(int(n) for n in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if nodules is None:
        nodules = [
            NoduleSpec(lung_point(shape, spacing_t, 0, -0.3, -0.2, 0.1), 6.0, 7.5),
            NoduleSpec(lung_point(shape, spacing_t, 1, 0.35, 0.3, -0.1), 9.0, 9.5),
            NoduleSpec(lung_point(shape, spacing_t, 0, 0.4, 0.35, 0.05), 12.0, 12.0),
            NoduleSpec(lung_point(shape, spacing_t, 1, -0.35, -0.3, 0.2), 8.0, 6.5),
            NoduleSpec(lung_point(shape, spacing_t, 0, 0.05, -0.45, -0.2), 5.0, 0.0),
            NoduleSpec(lung_point(shape, spacing_t, 1, 0.0, 0.45, 0.15), 0.0, 7.0),
        ]
    a = _anatomy(shape, spacing_t)
    lungs, axes = a.lungs, a.lung_axes
    cz, cy, cx = a.centre
    mapping = Breathing(
        shift_mm=shift_mm,
        amplitude_mm=amplitude_mm,
        expansion_mm=expansion_mm,
        z_apex_mm=cz - axes[0],
        z_base_mm=cz + axes[0],
        centre_yx_mm=(cy, cx),
        width_mm=0.6 * float(a.extent[2]),
    )
    prior_nodules = [
        (tuple(mapping(np.asarray(n.centre_mm))), n.prior_diameter_mm) for n in nodules
    ]
    current_nodules = [(n.centre_mm, n.current_diameter_mm) for n in nodules]
    prior_shape_t = tuple(int(n) for n in (prior_shape or shape))
    prior_spacing_t = tuple(float(v) for v in (prior_spacing or spacing_t))
    prior, prior_labels = render_chest(
        prior_shape_t,
        prior_spacing_t,
        nodules=prior_nodules,
        noise_hu=noise_hu,
        seed=seed,
        reference=(shape, spacing_t),
    )
    current, current_labels = render_chest(
        shape, spacing_t, mapping=mapping, nodules=current_nodules, noise_hu=noise_hu, seed=seed + 1
    )
    # Landmarks: random points well inside the follow-up's lungs (in the reference's lungs after
    # mapping), so their true images are defined.
    rng = np.random.default_rng(seed + 2)
    points: list[np.ndarray] = []
    while len(points) < landmarks:
        side = int(rng.integers(2))
        f = rng.uniform(-1, 1, size=3)
        if float(f @ f) > 0.6:
            continue
        guess = np.asarray(lungs[side]) + f * np.asarray(axes)
        image = (mapping(guess) - np.asarray(lungs[side])) / np.asarray(axes)
        if float(image @ image) <= 0.6:
            points.append(guess)
    # Nodule centres are landmarks too: where the follow-up is read.
    points += [np.asarray(n.centre_mm, dtype=float) for n in nodules]
    current_points = np.asarray(points)
    return PhantomPair(
        prior=prior,
        current=current,
        prior_labels=prior_labels,
        current_labels=current_labels,
        spacing=spacing_t,  # type: ignore[arg-type]
        prior_spacing=prior_spacing_t,  # type: ignore[arg-type]
        nodules=list(nodules),
        mapping=mapping,
        landmarks_current=current_points,
        landmarks_prior=mapping(current_points),
        interval_days=interval_days,
    )

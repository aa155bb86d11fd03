"""Lesion candidates and what the screening CNN sees of each one.

Detection is done in two stages, as in most published lung-nodule CAD: the segmenter proposes
lesion calls (sensitive, with false positives at the hilum, in dependent lung and at the
diaphragm), and the screening CNN looks at every call in its neighbourhood and gives the
probability that it is a lesion. Calls it rejects are dropped; a study's screening probability
is the highest of its candidates.

The CNN's input for one candidate, on the networks' 256 grid (:mod:`ml.networks`), centred on the
candidate's largest slice:

* the slice and one neighbour on each side, PATCH x PATCH pixels (about 75 mm);
* the middle slice again over WIDE x WIDE pixels, pooled to PATCH x PATCH, for anatomical context
  (a vessel entering the hilum and a nodule look alike up close);
* the candidate's own outline (all lesion calls in the patch), so the network knows what is asked.

This module imports numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PATCH = 64
WIDE = 128
HALF = 1  # neighbouring slices on each side
CHANNELS = 2 * HALF + 1 + 2


def centres(labels: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """(z, y, x) of components 1..n: the slice where each is largest, its centroid there."""
    out = []
    boxes = ndimage.find_objects(labels, max_label=n)
    for i, box in enumerate(boxes, start=1):
        if box is None:
            out.append((0, 0, 0))
            continue
        comp = labels[box] == i
        k = int(np.argmax(comp.sum(axis=(1, 2))))
        ys, xs = np.nonzero(comp[k])
        out.append(
            (
                box[0].start + k,
                int(round(box[1].start + ys.mean())),
                int(round(box[2].start + xs.mean())),
            )
        )
    return out


def patches(scaled: np.ndarray, calls: np.ndarray, at: list[tuple[int, int, int]]) -> np.ndarray:
    """Classifier inputs (len(at), CHANNELS, PATCH, PATCH) float32.

    ``scaled`` is the (z, y, x) volume on the grid with HU already scaled to [0, 1];
    ``calls`` the boolean lesion calls on the same grid; ``at`` the candidate centres on it.
    Beyond the volume's first and last slices the nearest slice repeats; beyond its sides is 0
    (air after scaling). Each window is cut out on its own: padding the whole grid volume
    instead cost three copies of it (most of a gigabyte on a clinical CT)."""
    out = np.zeros((len(at), CHANNELS, PATCH, PATCH), dtype=np.float32)
    if not at:
        return out
    r = WIDE // 2
    p = PATCH // 2
    pool = WIDE // PATCH
    depth = scaled.shape[0]
    for j, (z, y, x) in enumerate(at):
        around = np.clip(np.arange(z - HALF, z + HALF + 1), 0, depth - 1)
        out[j, : 2 * HALF + 1] = _window(scaled, around, y - p, x - p, PATCH)
        wide = _window(scaled, [z], y - r, x - r, WIDE)[0]
        out[j, 2 * HALF + 1] = wide.reshape(PATCH, pool, PATCH, pool).mean(axis=(1, 3))
        out[j, 2 * HALF + 2] = _window(calls, [z], y - p, x - p, PATCH)[0]
    return out


def _window(
    volume: np.ndarray, slices: np.ndarray | list[int], y0: int, x0: int, size: int
) -> np.ndarray:
    """float32 (len(slices), size, size) of ``volume`` from (y0, x0); 0 outside it."""
    out = np.zeros((len(slices), size, size), dtype=np.float32)
    h, w = volume.shape[1:]
    ya, yb = max(y0, 0), min(y0 + size, h)
    xa, xb = max(x0, 0), min(x0 + size, w)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = volume[np.asarray(slices), ya:yb, xa:xb]
    return out


def paste(
    maps: np.ndarray, at: list[tuple[int, int, int]], shape: tuple[int, int, int]
) -> np.ndarray:
    """Put per-candidate (PATCH x PATCH) maps back into a grid volume of ``shape``, keeping the
    larger value where candidates overlap."""
    out = np.zeros(shape, dtype=np.float32)
    p = PATCH // 2
    for m, (z, y, x) in zip(maps, at, strict=True):
        y0, x0 = y - p, x - p
        ys = slice(max(0, y0), min(shape[1], y0 + PATCH))
        xs = slice(max(0, x0), min(shape[2], x0 + PATCH))
        src = m[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        np.maximum(out[z, ys, xs], src, out=out[z, ys, xs])
    return out

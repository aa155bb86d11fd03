"""Look at inserted nodules: a few real LIDC nodules in each of the six backgrounds, one PNG.

Run by hand on the real data (never in tests):
    PYTHONPATH=$PWD python scripts/nodule_montage.py ../shared/data /tmp/montage.png [SEED]
Each row is one background; for each placement kind: the background before, after, and after
with the label outlined (axial slice through the nodule's centre, lung window, 70 mm square).
Pleural nodules are sources that touched their own chest wall; the others are free sources.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml.data.backgrounds import ANATOMIES, load_anatomy  # noqa: E402
from ml.data.compose import KINDS, PlacementIndex, attachment, compose  # noqa: E402
from ml.data.nodules import load_crop, read_nodule_table  # noqa: E402
from ml.data.splits import rows_in  # noqa: E402

FIELD_MM = 70.0


def _pick(lidc: Path, rows, rng: np.random.Generator, attached: bool):
    """A random crop; one touching its own chest wall for the pleura, a free one otherwise."""
    while True:
        crop = load_crop(lidc, rows[int(rng.integers(len(rows)))])
        if (attachment(crop) is not None) == attached:
            return crop


def main(data_dir: Path, out: Path, seed: int = 0) -> None:
    lidc = data_dir / "lidc-nodules"
    rows = rows_in(read_nodule_table(lidc / "nodules.csv", lidc), "train")
    rng = np.random.default_rng(seed)
    # Nodules of at least 6 mm, so that they can be seen at this size.
    rows = [r for r in rows if r.diameter_mm >= 6.0]
    fig, axes = plt.subplots(len(ANATOMIES), 3 * len(KINDS), figsize=(3 * 2.2 * 3, 2.2 * 6))
    for i, name in enumerate(ANATOMIES):
        t = time.perf_counter()
        bg = load_anatomy(data_dir, name)
        index = PlacementIndex(bg)
        crops = [_pick(lidc, rows, rng, attached=(kind == "pleural")) for kind in KINDS]
        hu, labels, sample = compose(bg, crops, list(KINDS), seed=seed + i, index=index)
        print(f"{name}: {bg.hu.shape} {bg.spacing} in {time.perf_counter() - t:.1f} s")
        for k, nod in enumerate(sample.nodules):
            print(
                f"  {nod.kind}: {nod.patient_id} #{nod.nodule_id} volume {nod.volume_mm3:.0f} "
                f"mm3 (nominal {nod.nominal_volume_mm3:.0f}) at voxel "
                f"{tuple(round(c) for c in nod.centre_voxel)}"
            )
            z, y, x = (int(round(c)) for c in nod.centre_voxel)
            hy, hx = (int(FIELD_MM / 2 / s) for s in bg.spacing[1:])
            sl = (z, slice(max(0, y - hy), y + hy), slice(max(0, x - hx), x + hx))
            for c, img in enumerate((bg.hu[sl], hu[sl], hu[sl])):
                ax = axes[i, 3 * k + c]
                ax.imshow(img, cmap="gray", vmin=-1350, vmax=150, interpolation="nearest")
                if c == 2:
                    ax.contour(
                        labels[sl] == nod.label_value, levels=[0.5], colors="r", linewidths=0.6
                    )
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_title(f"{name} {nod.kind}", fontsize=7)
                elif c == 1:
                    ax.set_title(
                        f"{nod.patient_id[-4:]}#{nod.nodule_id} x{nod.scale:g}", fontsize=7
                    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/montage.png")
    main(Path(sys.argv[1]), out, int(sys.argv[3]) if len(sys.argv) > 3 else 0)

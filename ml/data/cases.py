"""The real chest CTs that the semi-synthetic data is made from: their names, how to load them
from a data folder (`radai train --data DIR`), and the sentence that says what training used.
Imports `ml.data.synth`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ml.data.synth import load_nrrd_case, make_background

CASES = ("lung1", "lung2")
TRAINING_DATA = (
    "Semi-synthetic only: synthetic lesions (3-60 mm, log-uniform; solid and part-solid; round, "
    "lobulated and spiculated; free and pleura-attached) drawn by ml.synth into the lungs of two "
    "real chest CTs (pyradiomics test data lung1 and lung2, BSD-3) whose own tumours were removed "
    "first. No real lesion label was used for training."
)


def load_backgrounds(data_dir: Path, cases: Sequence[str] = CASES):
    """Backgrounds and real cases for the named NRRD pairs in ``data_dir``."""
    backgrounds, reals = {}, {}
    for i, case in enumerate(cases):
        hu, mask, spacing = load_nrrd_case(
            data_dir / f"{case}_image.nrrd", data_dir / f"{case}_label.nrrd"
        )
        backgrounds[case], reals[case] = make_background(case, hu, mask, spacing, seed=i)
    return backgrounds, reals

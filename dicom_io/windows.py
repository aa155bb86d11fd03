"""Display window presets for CT, (center, width) in Hounsfield units.

The viewer offers them and the sample series carry the lung one as their VOI LUT. Lung:
parenchyma (-850) mid-grey and nodules and vessels (0..100) near white. Mediastinum: fat (-100)
to enhanced vessels (+200). Bone: cortex (+1000) without clipping marrow. (The networks' input
normalisation is the models' own contract, `ml.preprocess.LUNG_WINDOW`, and does not follow a
change here.)
"""

from __future__ import annotations

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (40.0, 400.0),
    "Bone": (400.0, 1800.0),
}

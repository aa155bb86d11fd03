"""Where the repository's own test inputs are, wherever a test module sits."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"  # the bundled sample CTs (NRRD), committed with their licence

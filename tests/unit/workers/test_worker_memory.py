"""A worker's memory grows with the CT, not faster: what the analyser (the default `baseline`)
and the SEG/SR writing add for each extra slice of a chest-sized synthetic CT is a small, fixed
multiple of that slice.

Each size runs in a fresh interpreter so that its peak RSS is this work's alone. The growth is
the difference between two sizes (100 and 200 slices), so that one-off costs (lazy imports, the
SR's templates) cancel out; it is in units of the CT's int16 size (what the scanner sent), the
float32 volume itself being loaded before the measurement starts. Before the memory work of
issue #15 this measured about 9 (float32 saliency and int32 labels at full resolution, a one-hot
uint8 copy of every segment and highdicom's int64 overlap sum for the SEG); now about 2.5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# Extra peak RSS per extra int16 volume: the lung mask, uint8 labels, float16 saliency and the
# SEG's codes are a fraction of one each; the analyser's transient label arrays the rest.
MAX_GROWTH_PER_VOLUME = 5.0

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path

    from dicom_io.series import Volume
    from ml.runtime import qa
    from tests.kit.phantoms import chest_ct_phantom, ct_headers
    from workers.pipeline.analysers import BaselineAnalyser
    from workers.pipeline.claim import JobTicket
    from workers.pipeline.infer import run_analyser
    from workers.pipeline.write import write_results

    def status_kb(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    hu, spacing = chest_ct_phantom(slices=int(sys.argv[1]))
    headers = ct_headers(hu.shape, spacing)
    volume = Volume(hu, spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), headers, [])
    try:  # Linux: restart the peak count here (otherwise the peak since start is an upper bound)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = status_kb("VmRSS")
    analyser = BaselineAnalyser()
    check = qa.assess(volume.hu, volume.spacing_zyx)
    analysis = run_analyser(analyser, volume)
    written = write_results(
        JobTicket(1, 1, "1.2.3", "0" * 64, 1), volume, check, analysis, analyser,
        Path(sys.argv[2]), "memory-test",
    )
    peak = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "peak_delta_bytes": (peak - before) * 1024,
        "volume_int16_bytes": hu.size * 2,
        "lesions": len(written.findings.lesions),
        "segments": len(analysis.lesions) + 1,
    }))
    """
)


def measure(slices: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(slices), str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_peak_memory_grows_like_the_volume(tmp_path: Path) -> None:
    small, large = measure(100, tmp_path / "small"), measure(200, tmp_path / "large")
    # The phantom's nodule is found, so the SEG has overlapping lung and lesion segments: the
    # costliest case for the writer.
    assert small["lesions"] >= 1 and large["lesions"] >= 1
    growth = (large["peak_delta_bytes"] - small["peak_delta_bytes"]) / (
        large["volume_int16_bytes"] - small["volume_int16_bytes"]
    )
    assert growth < MAX_GROWTH_PER_VOLUME, f"peak grows {growth:.1f}x as fast as the volume"

"""Write the results as DICOM: a SEG (lung and one segment per lesion) and a TID 1500 SR, with the
saliency map beside them, and the `Findings` that describe them.

Takes the job, the `Volume`, its `QAReport`, the `Analysis` and the `Analyser`; gives `Written`.
Output UIDs derive from the job key, so a rerun after a crash rewrites the same files. With an
archive (RADAI_ARCHIVE_URL), the SEG and SR are also stored there by STOW-RS, and their output
rows name their WADO-RS address instead of this worker's local copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from db.findings import Findings
from dicom_io.archive import ArchiveClient
from dicom_io.series import Volume
from ml.runtime.qa import QAReport
from workers.dicom_out.seg import build_segmentation
from workers.dicom_out.sr import build_measurement_report
from workers.outputs import write_output
from workers.pipeline.analysers import Analyser, Analysis
from workers.pipeline.claim import JobTicket
from workers.pipeline.infer import findings_of


@dataclass(frozen=True)
class Written:
    findings: Findings
    outputs: list[dict[str, Any]]  # {"modality", "path", "sop_instance_uid", ...} per file
    seconds: float


def write_results(
    ticket: JobTicket,
    volume: Volume,
    check: QAReport,
    analysis: Analysis,
    analyser: Analyser,
    outputs_dir: Path,
    seed: str,
    malignancy: list[float] | None = None,
    archive: ArchiveClient | None = None,
) -> Written:
    t0 = time.perf_counter()
    folder = outputs_dir / ticket.study_uid / f"job-{ticket.job_id}"
    saliency_path = folder / "saliency.npz"
    findings = findings_of(analysis, volume, check, analyser, str(saliency_path), malignancy)
    seg_name, seg_version = analyser.segmentation_algorithm
    seg = build_segmentation(
        volume.datasets,
        analysis.lung_mask,
        analysis.lesion_labels,
        algorithm_name=seg_name,
        algorithm_version=seg_version,
        instance_uid_seed=seed + "/seg",
    )
    sr = build_measurement_report(
        volume.datasets,
        seg,
        [lesion.to_json() for lesion in findings.lesions],
        lung_volume_ml=analysis.lung_volume_ml,
        screening_probability=analysis.screening_probability,
        algorithm_name=seg_name,
        algorithm_version=seg_version,
        screening_algorithm=analyser.screening_algorithm,
        instance_uid_seed=seed + "/sr",
    )
    outputs = [
        write_output(folder / "seg.dcm", seg, "SEG"),
        write_output(folder / "sr.dcm", sr, "SR"),
    ]
    if archive is not None:
        # Same UIDs on a rerun (they derive from the job key): a second STOW replaces, not adds.
        archive.store([seg, sr])
        for out in outputs:
            # The local copy is this worker's; the archive's is where every machine finds it.
            out["path"] = archive.instance_url(
                ticket.study_uid, out["series_uid"], out["sop_instance_uid"]
            )
    np.savez_compressed(saliency_path, saliency=analysis.saliency.astype(np.float16))
    return Written(findings, outputs, time.perf_counter() - t0)

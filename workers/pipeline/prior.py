"""Find and load a study's prior for follow-up: earlier chest CTs of the same patient, first in
radai's own database (`db.priors.local_priors`), then on the PACS nodes of `RADAI_PRIOR_SOURCES`
(C-FIND at study and series level, C-GET of the chosen series into a bounded cache under
`RADAI_HOME`, `dicom_io.retrieve`).

A prior is loaded with the one series loader (`dicom_io.series`), so a prior with missing slices
is refused by the same checks as any series. Its lesions come from its own SEG when radai
analysed it (local priors: the nodules and tracking UIDs its report gave, with no second
analysis); a prior from a PACS has no radai SEG and is analysed by the caller. Anything that makes
a prior unusable (another patient, not a CT, no series, unreadable) raises `PriorUnusable` with a
reason for people; logs carry study UIDs and a keyed pseudonym of the patient, never the ID.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from sqlalchemy import select

from db import Instance, Job, Output, Series, Study, StudyState
from db.findings import Findings, FindingsError
from db.findings import Lesion as FoundLesion
from db.own_results import result_file
from db.priors import local_priors
from db.session import Database
from dicom_io.archive import ArchiveClient, ArchiveError
from dicom_io.destinations import Destination, format_destination
from dicom_io.retrieve import RetrieveError, find_series, find_studies, get_series
from dicom_io.series import SeriesError, Volume, load_series
from workers.selection import SeriesHeader, load_rules, why_not

log = logging.getLogger("radai.worker.followup")

# A worker tries at most this many candidates (the most recent first): each unusable one costs a
# load and perhaps a registration, and an older prior is a weaker comparison anyway.
MAX_CANDIDATES = 2
MAX_LOOKED_AT = 6  # candidates refused while loading (headers, series, retrieval) included
CACHE_DIRNAME = "prior-cache"
COMPLETE_MARK = ".complete"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LESION_SEGMENT = re.compile(r"^Lesion (\d+)$")


class PriorUnusable(Exception):
    """This prior cannot be compared with the current study; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PriorSources:
    """Where priors may come from beyond the database (`RADAI_PRIOR_SOURCES`) and the cache."""

    destinations: tuple[Destination, ...] = ()
    cache_dir: Path | None = None
    cache_max_mb: float = 2048.0
    calling_aet: str = "RADAI"
    timeout: float = 30.0
    # A worker on another machine reads the database's priors (and their SEG) by WADO-RS.
    archive: ArchiveClient | None = None


@dataclass
class Prior:
    """A loaded prior: its volume, and where radai analysed it, its lesion labels, lungs and
    findings (None: the caller analyses the volume)."""

    study_uid: str
    study_date: str | None
    source: str  # "local" or the PACS node's AET@HOST:PORT
    volume: Volume
    lesion_labels: np.ndarray | None = None
    lung_mask: np.ndarray | None = None
    lesions: tuple[FoundLesion, ...] = ()
    sop_refs: list[tuple[str, str]] = field(default_factory=list)  # (class, instance) of its CT


@dataclass(frozen=True)
class Candidate:
    study_uid: str
    study_date: str | None
    source: str
    load: Callable[[], Prior]


@dataclass(frozen=True)
class CurrentStudy:
    study_uid: str
    patient_id: str | None
    study_date: str | None


def current_study(db: Database, study_id: int) -> CurrentStudy:
    with db.session() as s:
        study = s.get_one(Study, study_id)
        return CurrentStudy(study.study_uid, study.patient_id, study.study_date)


def candidates(
    db: Database, study_id: int, volume: Volume, sources: PriorSources
) -> Iterator[Candidate]:
    """Priors to try, the most recent first: the database's, then each PACS node's."""
    with db.session() as s:
        study = s.get_one(Study, study_id)
        local = [(p.study_uid, p.study_date) for p in local_priors(s, study)]
        current_date = study.study_date
    for uid, day in local:
        yield Candidate(uid, day, "local", partial(load_local, db, uid, day, sources.archive))
    if not sources.destinations:
        return
    patient_id = str(volume.datasets[0].get("PatientID", "") or "").strip()
    if not patient_id:
        return
    known = {uid for uid, _ in local}
    current_uid = str(volume.datasets[0].StudyInstanceUID)
    for dest in sources.destinations:
        try:
            matches = find_studies(
                dest, patient_id, calling_aet=sources.calling_aet, timeout=sources.timeout
            )
        except RetrieveError as exc:
            log.warning("prior search on %s failed: %s", format_destination(dest), exc.reason)
            continue
        for m in sorted(matches, key=lambda m: m.study_date, reverse=True):
            if m.study_uid == current_uid or m.study_uid in known or not _UID.match(m.study_uid):
                continue
            if current_date and m.study_date and m.study_date >= current_date:
                continue
            known.add(m.study_uid)
            if m.modalities and "CT" not in m.modalities:
                # An MR or other study is never compared; it is named in the reason.
                yield Candidate(
                    m.study_uid,
                    m.study_date or None,
                    format_destination(dest),
                    _refuse(f"the prior is {'/'.join(m.modalities)}, not CT"),
                )
                continue
            yield Candidate(
                m.study_uid,
                m.study_date or None,
                format_destination(dest),
                partial(load_remote, dest, m.study_uid, m.study_date, sources),
            )


def _refuse(reason: str) -> Callable[[], Prior]:
    def load() -> Prior:
        raise PriorUnusable(reason)

    return load


def interval_days(current: str | None, prior: str | None) -> float:
    """Days from the prior's StudyDate to the current one's; refuses what cannot be measured."""
    if not current or not prior:
        raise PriorUnusable("a study date is missing, so the interval cannot be measured")
    try:
        days = (_date(current) - _date(prior)).days
    except ValueError:
        raise PriorUnusable(f"study date {prior!r} or {current!r} is not a date") from None
    if days <= 0:
        raise PriorUnusable(f"the prior is not from an earlier day ({prior} vs {current})")
    return float(days)


def _date(text: str) -> date:
    return date(int(text[0:4]), int(text[4:6]), int(text[6:8]))


def check_same_patient(current: Dataset, prior: Volume) -> None:
    """Refuse a prior whose instances name another patient: another Patient ID, or the same ID
    with another birth date or sex (an ID reused by two issuers)."""
    want = str(current.get("PatientID", "") or "").strip()
    for ds in prior.datasets:
        if str(ds.get("PatientID", "") or "").strip() != want:
            raise PriorUnusable("the prior is of a different patient (Patient ID differs)")
    first = prior.datasets[0]
    for keyword, what in (("PatientBirthDate", "birth date"), ("PatientSex", "sex")):
        a = str(current.get(keyword, "") or "").strip().upper()
        b = str(first.get(keyword, "") or "").strip().upper()
        if a and b and a != b and "O" not in (a, b):
            raise PriorUnusable(f"the prior is of a different patient (same ID, {what} differs)")


def check_ct(prior: Volume) -> None:
    modalities = {str(ds.get("Modality", "") or "?") for ds in prior.datasets}
    if modalities != {"CT"}:
        raise PriorUnusable(f"the prior series is {'/'.join(sorted(modalities))}, not CT")


def _load(files: Sequence[Path]) -> Volume:
    try:
        return load_series(files)
    except SeriesError as exc:
        raise PriorUnusable(f"the prior series is not usable: {exc}") from None


def load_local(
    db: Database, study_uid: str, study_date: str | None, archive: ArchiveClient | None = None
) -> Prior:
    """A prior radai analysed: the series its latest result analysed and that result's SEG.
    With ``archive``, both are read by WADO-RS rather than from the node's files."""
    with db.session() as s:
        row = s.execute(
            select(Job.id, Job.findings)
            .join(Study, Study.id == Job.study_id)
            .where(
                Study.study_uid == study_uid,
                Job.state == StudyState.DONE,
                Job.superseded.is_(False),
            )
            .order_by(Job.id.desc())
        ).first()
        if row is None:
            raise PriorUnusable("the prior has no result of radai's to compare with")
        job_id, stored = row
        try:
            findings = Findings.from_json(stored)
        except FindingsError as exc:
            raise PriorUnusable(f"the prior's findings cannot be read: {exc}") from None
        if findings is None or not findings.series_uid:
            raise PriorUnusable("the prior's result names no analysed series")
        rows = s.execute(
            select(Instance.archive_path, Instance.sop_instance_uid)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == findings.series_uid)
        ).all()
        seg = s.execute(
            select(Output.path, Output.series_uid, Output.sop_instance_uid).where(
                Output.job_id == job_id, Output.modality == "SEG"
            )
        ).first()
        # A remote worker's SEG row names its WADO-RS address; the node may hold a copy.
        seg_path = None if seg is None else result_file(s, seg[0], seg[2])
    files = [Path(p) for p, _ in rows]
    if archive is not None:
        try:
            local = archive.series_files(study_uid, findings.series_uid, [u for _, u in rows])
            files = [local[u] for _, u in rows]
            if seg is not None:
                seg_path = str(archive.series_files(study_uid, seg[1], [seg[2]])[seg[2]])
        except ArchiveError as exc:
            raise PriorUnusable(f"the prior cannot be read from the archive: {exc}") from None
    volume = _load(files)
    check_ct(volume)
    if findings.slices is not None and len(volume.datasets) != findings.slices:
        raise PriorUnusable(
            f"the prior series has {len(volume.datasets)} slices now, {findings.slices} when "
            "it was analysed"
        )
    labels = lungs = None
    if seg_path and Path(seg_path).exists():
        labels, lungs = read_seg(Path(seg_path), volume)
    return Prior(
        study_uid, study_date, "local", volume, labels, lungs, findings.lesions, _refs(volume)
    )


def read_seg(path: Path, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The lesion label map (labels as the SEG names them, "Lesion N") and the lung mask of a
    radai SEG, on the grid of the ``volume`` it was derived from."""
    seg = pydicom.dcmread(path)
    names: dict[int, str] = {
        int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence
    }
    index = {uid: z for z, uid in enumerate(volume.sop_instance_uids)}
    shape = volume.hu.shape
    labels = np.zeros(shape, dtype=np.int32)
    lungs = np.zeros(shape, dtype=bool)
    if (int(seg.Rows), int(seg.Columns)) != shape[1:]:
        raise PriorUnusable("the prior's SEG does not match its series' image size")
    if int(seg.get("NumberOfFrames") or 1) != len(seg.PerFrameFunctionalGroupsSequence):
        raise PriorUnusable("the prior's SEG describes another number of frames than it holds")
    # A frame at a time: all of a clinical CT's lung frames at once are another 140 MB while
    # both studies' volumes are held.
    frames = iter_pixels(seg)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for item, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=False):
        ident = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        number = int(ident[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = index.get(str(source.ReferencedSOPInstanceUID))
        if z is None:
            raise PriorUnusable("the prior's SEG refers to slices its series no longer holds")
        frame = pixels > 0
        name = names.get(number, "")
        lesion = _LESION_SEGMENT.match(name)
        if name == "Lung":
            lungs[z] |= frame
        elif lesion:
            labels[z][frame] = int(lesion.group(1))
    return labels, lungs


def _refs(volume: Volume) -> list[tuple[str, str]]:
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in volume.datasets]


def load_remote(dest: Destination, study_uid: str, study_date: str, sources: PriorSources) -> Prior:
    """A prior from a PACS node: its CT series with the most instances, fetched by C-GET into the
    cache (reused when complete), checked by the selection rules and the loader."""
    where = format_destination(dest)
    try:
        series = find_series(
            dest, study_uid, calling_aet=sources.calling_aet, timeout=sources.timeout
        )
    except RetrieveError as exc:
        raise PriorUnusable(f"series search on {where} failed: {exc.reason}") from None
    cts = [m for m in series if m.modality == "CT" and _UID.match(m.series_uid)]
    if not cts:
        found = "/".join(sorted({m.modality or "?" for m in series})) or "none"
        raise PriorUnusable(f"the prior on {where} holds no CT series (modalities: {found})")
    chosen = max(cts, key=lambda m: m.instances or 0)
    if sources.cache_dir is None:
        raise PriorUnusable("no cache folder for priors (RADAI_HOME) is configured")
    folder = sources.cache_dir / study_uid / chosen.series_uid
    if not (folder / COMPLETE_MARK).exists():
        shutil.rmtree(folder, ignore_errors=True)
        try:
            get_series(
                dest,
                study_uid,
                chosen.series_uid,
                folder,
                calling_aet=sources.calling_aet,
                timeout=max(sources.timeout, 60.0),
            )
        except RetrieveError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise PriorUnusable(f"retrieving the prior from {where} failed: {exc.reason}") from None
        (folder / COMPLETE_MARK).touch()
        prune_cache(sources.cache_dir, sources.cache_max_mb, keep=folder.parent)
    files = sorted(folder.glob("*.dcm"))
    reason = why_not(load_rules(), header_of(chosen.series_uid, files))
    if reason:
        raise PriorUnusable(f"the prior series does not fit the chest CT rules: {reason}")
    volume = _load(files)
    check_ct(volume)
    return Prior(study_uid, study_date or None, where, volume, sop_refs=_refs(volume))


def header_of(series_uid: str, files: Sequence[Path]) -> SeriesHeader:
    modalities: set[str] = set()
    classes: set[str] = set()
    types: set[str] = set()
    body: str | None = None
    thick: float | None = None
    for file in files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        modalities.add(str(ds.get("Modality", "")))
        classes.add(str(ds.SOPClassUID))
        body = body or (str(ds.get("BodyPartExamined", "")) or None)
        if ds.get("SliceThickness") not in (None, ""):
            thick = max(thick or 0.0, float(ds.SliceThickness))
        types.update(str(t).upper() for t in (ds.get("ImageType") or []))
    return SeriesHeader(
        series_uid=series_uid,
        modality=modalities.pop() if len(modalities) == 1 else None,
        sop_class_uids=frozenset(classes),
        body_part=body,
        slice_count=len(files),
        slice_thickness_mm=thick,
        image_types=frozenset(types),
    )


def prune_cache(cache_dir: Path, max_mb: float, keep: Path | None = None) -> None:
    """Remove the least recently fetched studies until the cache holds at most ``max_mb``."""
    studies = [p for p in cache_dir.iterdir() if p.is_dir()] if cache_dir.exists() else []
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in studies}
    total = sum(sizes.values())
    for study in sorted(studies, key=lambda p: p.stat().st_mtime):
        if total <= max_mb * 1e6:
            break
        if keep is not None and study == keep:
            continue
        shutil.rmtree(study, ignore_errors=True)
        total -= sizes[study]

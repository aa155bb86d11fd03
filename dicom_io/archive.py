"""A DICOMweb archive as a worker's only view of the images: series fetched by WADO-RS into a
bounded local cache, results stored back by STOW-RS (PS3.18, any conformant server).

The cache keeps one file per instance under ``root/<study>/<series>/``; a file's name carries the
SHA-256 of its bytes, so a file damaged on disk (or cut short by a crash) is seen as such, deleted
and fetched again instead of being analysed. Files are written to a ``.partial`` name and renamed
only when complete. When the cache grows past its bound, the least recently used files go first;
the series being handed out is never evicted to make room for itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

log = logging.getLogger("radai.archive")

PARTIAL = ".partial"
SUFFIX = ".dcm"

# (SOP Instance UID, Part 10 bytes) for each instance of one series.
Fetch = Callable[[], Iterable[tuple[str, bytes]]]


class ArchiveError(Exception):
    """The archive did not give what was asked (missing instances, an HTTP error or no answer to
    a retrieval, a refused store)."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{PARTIAL}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class SeriesCache:
    """Instances of whole series on local disk, at most ``max_bytes`` in all (LRU by use)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def _folder(self, study_uid: str, series_uid: str) -> Path:
        for uid in (study_uid, series_uid):
            if not uid or "/" in uid or uid.startswith("."):
                raise ValueError(f"not a UID: {uid!r}")
        return self.root / study_uid / series_uid

    def _valid(self, folder: Path) -> dict[str, Path]:
        """The intact cached instances of a folder by SOP Instance UID; damaged ones deleted."""
        found: dict[str, Path] = {}
        if not folder.is_dir():
            return found
        for path in folder.iterdir():
            if path.name.endswith(PARTIAL):
                path.unlink(missing_ok=True)  # left by a crash mid-write: never reused
                continue
            sop, _, rest = path.name.rpartition("-")
            if not sop or not rest.endswith(SUFFIX):
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            if _digest(data) != rest[: -len(SUFFIX)]:
                log.warning("cached instance %s is damaged; fetching it again", sop)
                path.unlink(missing_ok=True)
                continue
            found[sop] = path
        return found

    def series(
        self, study_uid: str, series_uid: str, sop_uids: Iterable[str], fetch: Fetch
    ) -> dict[str, Path]:
        """Local files of the series' ``sop_uids``, fetched (all of the series) unless cached."""
        wanted = set(sop_uids)
        folder = self._folder(study_uid, series_uid)
        have = self._valid(folder)
        if not wanted <= have.keys():
            for sop, data in fetch():
                if sop in have:
                    continue
                path = folder / f"{sop}-{_digest(data)}{SUFFIX}"
                _write_atomic(path, data)
                have[sop] = path
            missing = wanted - have.keys()
            if missing:
                raise ArchiveError(
                    f"the archive lacks {len(missing)} of the series' {len(wanted)} instances"
                )
        now = time.time()
        chosen = {sop: have[sop] for sop in wanted}
        for path in chosen.values():
            os.utime(path, (now, now))  # most recently used
        self.evict(keep=set(chosen.values()))
        return chosen

    def _files(self) -> list[tuple[float, int, Path]]:
        entries = []
        for path in self.root.rglob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        return entries

    def size(self) -> int:
        return sum(size for _, size, _ in self._files())

    def evict(self, keep: frozenset[Path] | set[Path] = frozenset()) -> int:
        """Delete least recently used files until within the bound; return bytes freed."""
        entries = sorted(self._files())
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in entries:
            if total - freed <= self.max_bytes:
                break
            if path in keep:
                continue
            path.unlink(missing_ok=True)
            freed += size
            try:
                path.parent.rmdir()  # only when empty
                path.parent.parent.rmdir()
            except OSError:
                pass
        return freed


def _part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _failure(exc: requests.RequestException) -> str:
    """An HTTP status with its reason, or the kind of failure when no whole answer came.
    dicomweb-client has retried the request by then (five attempts with backoff on a failed
    connection or timeout and on 408, 429, 503 and 504)."""
    response = exc.response
    if response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    return f"no complete answer ({type(exc).__name__})"


@dataclass(frozen=True)
class ArchiveSettings:
    url: str
    token: str = ""
    verify: bool | str = True  # False, True or a CA bundle's path
    timeout: float = 60.0


class ArchiveClient:
    """WADO-RS reads through a `SeriesCache`, STOW-RS writes, over one HTTP session."""

    def __init__(self, settings: ArchiveSettings, cache: SeriesCache) -> None:
        session = requests.Session()
        session.verify = settings.verify
        session.trust_env = False  # an http_proxy meant for the internet must not see images
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else None
        self.cache = cache
        self.url = settings.url.rstrip("/")
        self._client = DICOMwebClient(
            settings.url.rstrip("/"), session=session, headers=headers, timeout=settings.timeout
        )

    def series_files(
        self, study_uid: str, series_uid: str, sop_uids: Iterable[str]
    ) -> dict[str, Path]:
        """Local paths of the instances, by SOP Instance UID; `ArchiveError` when the archive
        does not give them all (missing, an HTTP error, no answer)."""

        def fetch() -> Iterable[tuple[str, bytes]]:
            for ds in self._client.iter_series(study_uid, series_uid):
                yield str(ds.SOPInstanceUID), _part10(ds)

        try:
            return self.cache.series(study_uid, series_uid, sop_uids, fetch)
        except requests.RequestException as exc:
            # Callers handle ArchiveError only: a prior that cannot be read is then named as
            # such in the findings rather than lost to an unexpected exception.
            raise ArchiveError(
                f"WADO-RS retrieval of series {series_uid} of study {study_uid} failed: "
                f"{_failure(exc)}"
            ) from exc

    def instance_url(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The instance's WADO-RS address."""
        return f"{self.url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"

    def store(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS the datasets (one study); raise `ArchiveError` unless all were stored."""
        if not datasets:
            return
        study_uid = str(datasets[0].StudyInstanceUID)
        # dicomweb-client writes each dataset as it is: one built in memory has no preamble nor
        # "DICM" prefix, and some servers (Orthanc) keep such bytes, which no reader then opens.
        # A Part 10 round trip gives each its preamble and file meta.
        parts = [pydicom.dcmread(BytesIO(_part10(ds))) for ds in datasets]
        try:
            response = self._client.store_instances(parts, study_instance_uid=study_uid)
        except requests.HTTPError as exc:
            raise ArchiveError(f"STOW-RS refused: {exc}") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise ArchiveError(f"STOW-RS failed for {len(failed)} of {len(datasets)} instances")

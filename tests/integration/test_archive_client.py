"""The remote worker's DICOMweb client over real sockets: WADO-RS from Orthanc's DICOMweb plugin
into the bounded cache, STOW-RS back, and radai's own DICOMweb server refusing a bad token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from db.api_tokens import create_token
from db.users import add_user
from dicom_io.archive import ArchiveClient, ArchiveError, ArchiveSettings, SeriesCache
from tests.kit.dicomweb import ct_instance, dicomweb_server, save
from tests.kit.net import HOST
from tests.kit.orthanc import OrthancServer
from tests.system.test_remote_worker import upload


def _series(folder: Path, n: int = 4) -> tuple[str, str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    files = [save(ct_instance(study, series, number=i, size=64), folder) for i in range(1, n + 1)]
    return study, series, files


def test_wado_into_the_cache_and_stow_back_with_orthanc(tmp_path: Path) -> None:
    study, series, files = _series(tmp_path / "in")
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    with OrthancServer(dicomweb=True) as orthanc:
        upload(orthanc, files)
        cache = SeriesCache(tmp_path / "cache", 10 << 20)
        client = ArchiveClient(ArchiveSettings(orthanc.dicomweb_url), cache)
        local = client.series_files(study, series, sops)
        for original in files:
            want = pydicom.dcmread(original)
            got = pydicom.dcmread(local[str(want.SOPInstanceUID)])
            assert np.array_equal(got.pixel_array, want.pixel_array)
        # Under a bound smaller than a series, the next series evicts all of the last one but is
        # itself handed out whole.
        cache.max_bytes = sum(p.stat().st_size for p in local.values()) // 2
        study2, series2, files2 = _series(tmp_path / "in2")
        upload(orthanc, files2)
        local2 = client.series_files(study2, series2, [f.stem for f in files2])
        assert not any(p.exists() for p in local.values())
        assert sorted(cache.root.rglob("*.dcm")) == sorted(local2.values())

        extra = ct_instance(study, series, number=9, size=64)
        client.store([extra])
        uids = {str(orthanc.instance_tags(i)["SOPInstanceUID"]) for i in orthanc.instances()}
        assert str(extra.SOPInstanceUID) in uids
        with pytest.raises(ArchiveError):
            client.series_files(study, series, [*sops, generate_uid()])


def test_radais_dicomweb_refuses_a_store_without_a_worker_token(
    sqlite_db,  # noqa: ANN001
    node_factory,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    node = node_factory(sqlite_db)
    with sqlite_db.session() as s:
        add_user(s, "rad", "radiologist", "password-123", actor="test")
        reader = create_token(s, "rad", actor="test")[1]
        worker = create_token(s, "rad", role="worker", actor="test")[1]
    study, series = generate_uid(), generate_uid()
    with dicomweb_server(sqlite_db, node.node.store) as web:
        url = f"http://{HOST}:{web.port}/dicomweb"
        cache = SeriesCache(tmp_path / "cache", 10 << 20)
        with pytest.raises(ArchiveError, match="refused"):
            ArchiveClient(ArchiveSettings(url, reader), cache).store([ct_instance(study, series)])
        ds = ct_instance(study, series)
        client = ArchiveClient(ArchiveSettings(url, worker), cache)
        client.store([ds])
        local = client.series_files(study, series, [str(ds.SOPInstanceUID)])
        assert pydicom.dcmread(local[str(ds.SOPInstanceUID)]).StudyInstanceUID == study

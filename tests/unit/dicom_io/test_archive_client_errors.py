"""The DICOMweb archive client's retrieval failures surface as ArchiveError, with the status and
the series asked for, against a local HTTP server that refuses (no mock of requests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.archive import ArchiveClient, ArchiveError, ArchiveSettings, SeriesCache
from tests.kit.dicomweb import refusing_archive
from tests.kit.net import HOST, free_port

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"


def _client(url: str, tmp_path: Path) -> ArchiveClient:
    return ArchiveClient(ArchiveSettings(url, token="t"), SeriesCache(tmp_path / "cache", 1 << 20))


@pytest.mark.parametrize("status", [404, 500])
def test_an_http_error_is_an_archive_error_naming_status_and_series(
    tmp_path: Path, status: int
) -> None:
    with refusing_archive(status) as archive:
        client = _client(archive.url, tmp_path)
        with pytest.raises(ArchiveError) as caught:
            client.series_files(STUDY, SERIES, ["1.2.3"])
    message = str(caught.value)
    assert f"HTTP {status}" in message and SERIES in message and STUDY in message
    assert archive.asked == [f"/dicomweb/studies/{STUDY}/series/{SERIES}"]
    assert not list((tmp_path / "cache").rglob("*.dcm"))


def test_no_answer_is_an_archive_error(tmp_path: Path) -> None:
    client = _client(f"http://{HOST}:{free_port()}/dicomweb", tmp_path)
    # Nothing listens there; without this the client retries five times over about 30 s.
    client._client.set_http_retry_params(retry=False)
    with pytest.raises(ArchiveError, match=r"no complete answer \(ConnectionError\)"):
        client.series_files(STUDY, SERIES, ["1.2.3"])

"""DICOMweb on a running node, over real sockets, with dicomweb-client (the ImagingDataCommons
library) as the peer: search, retrieve, metadata, frames, rendered images, STOW-RS through the
node's own store path, and refusals with their PS3.18 statuses."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from db import AuditEntry, IngestFailure, Instance
from db.api_tokens import create_token
from db.users import add_user
from dicom_io.cstore import send_files
from dicomweb.app import Service, build_app
from dicomweb.multipart import parse
from tests.helpers import count
from tests.kit.dicomweb import ct_instance, dicomweb_server, save
from tests.kit.net import HOST

DICOM = "application/dicom"
STUDY_A, STUDY_B = generate_uid(), generate_uid()
SERIES_A, SERIES_A2, SERIES_B = generate_uid(), generate_uid(), generate_uid()


@pytest.fixture
def web(sqlite_db, node_factory, tmp_path: Path) -> Iterator[dict]:  # noqa: ANN001
    node = node_factory(sqlite_db)
    files = [save(ct_instance(STUDY_A, SERIES_A, number=n), tmp_path / "a") for n in (1, 2, 3)]
    files.append(
        save(ct_instance(STUDY_A, SERIES_A2, number=1, series_number=2, rle=True), tmp_path / "a2")
    )
    files.append(
        save(
            ct_instance(
                STUDY_B,
                SERIES_B,
                patient_name="ROE^RICHARD",
                patient_id="PID-2",
                study_date="20260301",
                accession="ACC2",
            ),
            tmp_path / "b",
        )
    )
    send_files(files, ("RADAI", HOST, node.port), calling_aet="TESTSCU")
    with sqlite_db.session() as s:
        add_user(s, "rad", "radiologist", "password-123", actor="test")
        add_user(s, "aud", "auditor", "password-123", actor="test")
        tokens = {
            "rad": create_token(s, "rad", actor="test")[1],
            "worker": create_token(s, "rad", role="worker", actor="test")[1],
            "aud": create_token(s, "aud", actor="test")[1],
        }
    with dicomweb_server(sqlite_db, node.node.store) as server:
        url = f"http://{HOST}:{server.port}/dicomweb"
        yield {"db": sqlite_db, "url": url, "tokens": tokens, "files": files, "node": node}


def _client(web: dict, who: str = "rad") -> DICOMwebClient:
    return DICOMwebClient(url=web["url"], headers={"Authorization": f"Bearer {web['tokens'][who]}"})


def _value(doc: dict, tag: str):  # noqa: ANN202
    return doc[tag].get("Value", [None])[0]


def test_search_studies_with_matching_keys_and_paging(web: dict) -> None:
    client = _client(web)
    studies = client.search_for_studies()
    assert {_value(d, "0020000D") for d in studies} == {STUDY_A, STUDY_B}
    first = next(d for d in studies if _value(d, "0020000D") == STUDY_A)
    assert _value(first, "00201206") == 2  # series in the study
    assert _value(first, "00201208") == 4  # instances
    assert _value(first, "00100010") == {"Alphabetic": "DOE^JANE"}

    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(search_filters={"PatientName": "ROE*"})
    ] == [STUDY_B]
    assert client.search_for_studies(search_filters={"PatientName": "roe*"}) == []
    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(
            search_filters={"PatientName": "roe"}, fuzzymatching=True
        )
    ] == [STUDY_B]
    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(search_filters={"StudyDate": "20260201-"})
    ] == [STUDY_B]
    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(search_filters={"PatientID": "PID-1"})
    ] == [STUDY_A]

    page1 = client.search_for_studies(limit=1)
    page2 = client.search_for_studies(limit=1, offset=1)
    assert len(page1) == len(page2) == 1 and page1[0] != page2[0]
    assert client.search_for_studies(offset=2) == []


def test_search_series_and_instances(web: dict) -> None:
    client = _client(web)
    series = client.search_for_series(STUDY_A)
    assert {_value(d, "0020000E") for d in series} == {SERIES_A, SERIES_A2}
    assert [
        _value(d, "0020000E")
        for d in client.search_for_series(search_filters={"PatientID": "PID-2"})
    ] == [SERIES_B]
    instances = client.search_for_instances(STUDY_A, SERIES_A)
    assert [_value(d, "00200013") for d in instances] == [1, 2, 3]
    some = client.search_for_instances(
        STUDY_A, SERIES_A, search_filters={"InstanceNumber": "2"}, fields=["ImageType", "Rows"]
    )
    assert len(some) == 1 and _value(some[0], "00280010") == 16
    everything = client.search_for_instances(fields=["all"])
    assert len(everything) == 5 and "00180050" in everything[0]  # SliceThickness: all fields


def test_retrieve_series_study_metadata_frames_and_rendered(web: dict) -> None:
    client = _client(web)
    series = client.retrieve_series(STUDY_A, SERIES_A)
    assert sorted(int(ds.InstanceNumber) for ds in series) == [1, 2, 3]
    sent = pydicom.dcmread(web["files"][0])
    got = next(ds for ds in series if ds.SOPInstanceUID == sent.SOPInstanceUID)
    assert got.PixelData == sent.PixelData

    # Stored RLE: as stored when any syntax will do, decoded when Explicit VR LE is asked for.
    rle_file = pydicom.dcmread(web["files"][3])
    (as_stored,) = client.retrieve_series(
        STUDY_A, SERIES_A2, media_types=(("application/dicom", "*"),)
    )
    assert as_stored.file_meta.TransferSyntaxUID == RLELossless
    (decoded,) = client.retrieve_series(
        STUDY_A, SERIES_A2, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),)
    )
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (decoded.pixel_array == rle_file.pixel_array).all()

    metadata = client.retrieve_study_metadata(STUDY_A)
    assert len(metadata) == 4
    assert all("BulkDataURI" in doc["7FE00010"] for doc in metadata)
    bulk = client.retrieve_bulkdata(metadata[0]["7FE00010"]["BulkDataURI"])
    assert len(bulk[0]) == 16 * 16 * 2

    (frame,) = client.retrieve_instance_frames(
        STUDY_A, SERIES_A, sent.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == sent.PixelData

    with web["db"].session() as s:
        from sqlalchemy import select

        reads = s.execute(
            select(AuditEntry).where(AuditEntry.action == "dicomweb.retrieved")
        ).scalars()
        assert {(e.actor, e.study_uid, e.detail["what"]) for e in reads} == {
            ("dicomweb:rad", STUDY_A, "instances"),
            ("dicomweb:rad", STUDY_A, "metadata"),
            ("dicomweb:rad", STUDY_A, "bulk"),
            ("dicomweb:rad", STUDY_A, "frames"),
        }

    png = client.retrieve_instance_rendered(
        STUDY_A, SERIES_A, sent.SOPInstanceUID, media_types=("image/png",)
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    headers = {"Authorization": f"Bearer {web['tokens']['rad']}", "Accept": "image/png"}
    thumb = requests.get(f"{web['url']}/studies/{STUDY_A}/thumbnail", headers=headers, timeout=30)
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"


def test_without_a_valid_token_or_role_nothing_is_answered(web: dict) -> None:
    url = f"{web['url']}/studies"
    assert requests.get(url, timeout=30).status_code == 401
    bad = {"Authorization": "Bearer radai_not-a-token"}
    assert requests.get(url, headers=bad, timeout=30).status_code == 401
    auditor = {"Authorization": f"Bearer {web['tokens']['aud']}"}
    assert requests.get(url, headers=auditor, timeout=30).status_code == 403
    radiologist = {"Authorization": f"Bearer {web['tokens']['rad']}"}
    stow = requests.post(
        url,
        data=b"--x\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--x--\r\n",
        headers={
            **radiologist,
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
        },
        timeout=30,
    )
    assert stow.status_code == 403  # radiologists read; admins and workers store
    # The wrong token and the refused roles are audited; the request without one only logged.
    assert count(web["db"], AuditEntry, AuditEntry.action == "dicomweb.refused") == 3


def test_bad_requests_get_their_status_and_a_reason(web: dict) -> None:
    auth = {"Authorization": f"Bearer {web['tokens']['rad']}"}
    base = web["url"]
    cases = [
        (f"{base}/studies?limit=-1", {}, 400),
        (f"{base}/studies?NoSuchAttribute=1", {}, 400),
        (f"{base}/studies?00081111.00081150=1", {}, 400),
        (f"{base}/studies/1.2.3", {}, 404),
        (f"{base}/studies/{STUDY_A}/series/1.2.3/metadata", {}, 404),
        (f"{base}/studies", {"Accept": "application/dicom+xml"}, 406),
        (f"{base}/studies/{STUDY_A}", {"Accept": 'multipart/related; type="image/jpeg"'}, 406),
        (
            f"{base}/studies/{STUDY_A}",
            {
                "Accept": 'multipart/related; type="application/dicom"; '
                "transfer-syntax=1.2.840.10008.1.2.4.50"
            },
            406,
        ),
    ]
    for url, headers, status in cases:
        response = requests.get(url, headers={**auth, **headers}, timeout=30)
        assert response.status_code == status, (url, response.text)
        assert response.text.strip() and "Traceback" not in response.text
    post = requests.post(
        f"{base}/studies",
        data=b"not multipart",
        headers={
            "Authorization": f"Bearer {web['tokens']['worker']}",
            "Content-Type": "application/json",
        },
        timeout=30,
    )
    assert post.status_code == 415


def test_stow_stores_through_the_node_and_deduplicates(web: dict, tmp_path: Path) -> None:
    client = _client(web, "worker")
    db = web["db"]
    new_study, new_series = generate_uid(), generate_uid()
    ds = ct_instance(new_study, new_series, patient_id="PID-3")
    before = count(db, AuditEntry)
    response = client.store_instances([ds])
    assert "00081198" not in response  # nothing failed
    assert count(db, Instance, Instance.sop_instance_uid == ds.SOPInstanceUID) == 1
    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(search_filters={"PatientID": "PID-3"})
    ] == [new_study]
    assert count(db, AuditEntry) > before  # received + the STOW's own entry

    # The same instance again: acknowledged as C-STORE acknowledges a duplicate, held once.
    again = client.store_instances([ds])
    assert "00081198" not in again
    assert count(db, Instance, Instance.sop_instance_uid == ds.SOPInstanceUID) == 1

    # A part of another study than the path names fails and is not stored.
    other = ct_instance(generate_uid(), generate_uid())
    with pytest.raises(requests.HTTPError) as err:
        client.store_instances([other], study_instance_uid=new_study)
    assert err.value.response.status_code == 409
    assert count(db, Instance, Instance.sop_instance_uid == other.SOPInstanceUID) == 0


def test_stow_of_garbage_stores_nothing_and_is_audited_like_a_bad_cstore(web: dict) -> None:
    db = web["db"]
    instances_before = count(db, Instance)
    failures_before = count(db, IngestFailure)
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00garbage" * 50 + b"\r\n--b--\r\n"
    )
    response = requests.post(
        f"{web['url']}/studies",
        data=body,
        headers={
            "Authorization": f"Bearer {web['tokens']['worker']}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        },
        timeout=30,
    )
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"][0] == 0xC000  # the C-STORE status: cannot understand
    assert count(db, Instance) == instances_before
    assert count(db, IngestFailure) == failures_before + 1
    with db.session() as s:
        from sqlalchemy import select

        actions = s.execute(select(AuditEntry.action).order_by(AuditEntry.seq.desc()).limit(2))
        assert {"instance.refused", "dicomweb.stored"} <= set(actions.scalars())

    # A body that is not multipart at all: 400 and a refusal entry, nothing stored.
    broken = requests.post(
        f"{web['url']}/studies",
        data=b"garbage without boundary",
        headers={
            "Authorization": f"Bearer {web['tokens']['worker']}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=zz',
        },
        timeout=30,
    )
    assert broken.status_code == 400 and "Traceback" not in broken.text
    assert count(db, Instance) == instances_before
    assert count(db, AuditEntry, AuditEntry.action == "dicomweb.refused") == 1


def test_anonymous_access_reads_only_when_configured(sqlite_db, node_factory) -> None:  # noqa: ANN001
    node = node_factory(sqlite_db)
    with dicomweb_server(sqlite_db, node.node.store, anonymous=True) as server:
        url = f"http://{HOST}:{server.port}/dicomweb/studies"
        assert requests.get(url, timeout=30).status_code == 200
        stow = requests.post(
            url,
            data=b"--x\r\n\r\n\r\n--x--\r\n",
            headers={"Content-Type": "multipart/related; boundary=x"},
            timeout=30,
        )
        assert stow.status_code == 403


def test_tls_only_with_the_nodes_certificate(sqlite_db, node_factory, tmp_path: Path) -> None:  # noqa: ANN001
    import subprocess

    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        [
            "/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    node = node_factory(sqlite_db)
    with sqlite_db.session() as s:
        add_user(s, "rad", "radiologist", "password-123", actor="test")
        token = create_token(s, "rad", actor="test")[1]
    with dicomweb_server(sqlite_db, node.node.store, tls_cert=cert, tls_key=key) as server:
        headers = {"Authorization": f"Bearer {token}"}
        secure = f"https://{HOST}:{server.port}/dicomweb"
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the CA given here
        session.verify = str(cert)
        client = DICOMwebClient(url=secure, headers=headers, session=session)
        assert client.search_for_studies() == []
        with pytest.raises(requests.ConnectionError):
            requests.get(
                f"http://{HOST}:{server.port}/dicomweb/studies", headers=headers, timeout=10
            )


def _audit(db, action: str) -> list[AuditEntry]:  # noqa: ANN001
    from sqlalchemy import select

    with db.session() as s:
        rows = s.execute(select(AuditEntry).where(AuditEntry.action == action))
        return list(rows.scalars())


def test_instances_transcoded_into_lossless_syntaxes_and_back(web: dict) -> None:
    client = _client(web)
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in web["files"][:3]}
    for ts in (RLELossless, JPEGLSLossless):
        series = client.retrieve_series(STUDY_A, SERIES_A, media_types=((DICOM, ts),))
        assert len(series) == 3
        for ds in series:
            original = sent[ds.SOPInstanceUID]  # the same instance: its UID is kept
            assert ds.file_meta.TransferSyntaxUID == ts
            assert ds.PixelData != original.PixelData  # encapsulated
            assert np.array_equal(ds.pixel_array, original.pixel_array)

    # Stored RLE into JPEG-LS, and decoded: the same pixels and the same instance.
    rle_file = pydicom.dcmread(web["files"][3])
    (jls,) = client.retrieve_series(STUDY_A, SERIES_A2, media_types=((DICOM, JPEGLSLossless),))
    assert jls.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert jls.SOPInstanceUID == rle_file.SOPInstanceUID
    assert np.array_equal(jls.pixel_array, rle_file.pixel_array)

    # A syntax radai cannot give first, then one it can: the client's next choice.
    headers = {
        "Authorization": f"Bearer {web['tokens']['rad']}",
        "Accept": f'multipart/related; type="{DICOM}"; transfer-syntax={JPEG2000Lossless}, '
        f'multipart/related; type="{DICOM}"; transfer-syntax={RLELossless}; q=0.9',
    }
    url = f"{web['url']}/studies/{STUDY_A}/series/{SERIES_A}"
    response = requests.get(url, headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.text.count(f"transfer-syntax={RLELossless}") == 3
    # Only that one: 406 with the reason (16x16 is below what JPEG 2000 is encoded at).
    headers["Accept"] = f'multipart/related; type="{DICOM}"; transfer-syntax={JPEG2000Lossless}'
    refused = requests.get(url, headers=headers, timeout=30)
    assert refused.status_code == 406 and "32 pixels" in refused.text

    # Frames: each encoded alone in JPEG-LS.
    uid = next(iter(sent))
    (frame,) = client.retrieve_instance_frames(
        STUDY_A, SERIES_A, uid, frame_numbers=[1], media_types=(("image/jls", JPEGLSLossless),)
    )
    single = copy.deepcopy(sent[uid])
    single.PixelData = encapsulate([frame])
    single.file_meta.TransferSyntaxUID = JPEGLSLossless
    assert np.array_equal(single.pixel_array, sent[uid].pixel_array)


@pytest.fixture
def big_series(sqlite_db, node_factory, tmp_path: Path) -> Iterator[dict]:  # noqa: ANN001
    node = node_factory(sqlite_db)
    study, series = generate_uid(), generate_uid()
    files = [
        save(ct_instance(study, series, number=n, size=32), tmp_path / "big")
        for n in range(1, BIG + 1)
    ]
    send_files(files, ("RADAI", HOST, node.port), calling_aet="TESTSCU")
    with sqlite_db.session() as s:
        add_user(s, "rad", "radiologist", "password-123", actor="test")
        token = create_token(s, "rad", actor="test")[1]
    with dicomweb_server(sqlite_db, node.node.store) as server:
        yield {
            "db": sqlite_db,
            "url": f"http://{HOST}:{server.port}/dicomweb",
            "token": token,
            "study": study,
            "series": series,
            "files": files,
        }


BIG = 40


def test_a_series_streams_one_instance_at_a_time(
    big_series: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = big_series
    auth = {"Authorization": f"Bearer {web['token']}"}
    client = DICOMwebClient(url=web["url"], headers=auth)
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in web["files"]}
    got = client.retrieve_series(web["study"], web["series"])
    assert sorted(int(ds.InstanceNumber) for ds in got) == list(range(1, BIG + 1))
    streamed = list(client.iter_series(web["study"], web["series"]))
    assert {ds.SOPInstanceUID for ds in streamed} == sent

    # Sent as produced: chunked, no length known in advance; the boundary names the parts.
    url = f"{web['url']}/studies/{web['study']}/series/{web['series']}"
    with requests.get(url, headers=auth, stream=True, timeout=30) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        content_type = response.headers["content-type"]
        body = response.raw.read()
    declared, parts = parse(body, content_type)
    assert declared == DICOM and len(parts) == BIG
    with web["db"].session() as s:
        from sqlalchemy import select

        archived = {Path(p) for p in s.execute(select(Instance.archive_path)).scalars()}
    # As stored: the archive's files, byte for byte.
    assert {p.body for p in parts} == {path.read_bytes() for path in archived}

    # The server reads each file only when its part is sent: driven over ASGI, the k-th part's
    # head leaves before the k-th file is opened, and the last file is opened after the first
    # part has left.
    opened: list[Path] = []
    real_open = Path.open

    def counting_open(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self in archived:
            opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    app = build_app(Service(web["db"], None))
    path = f"/dicomweb/studies/{web['study']}/series/{web['series']}"
    messages = asyncio.run(_asgi_get(app, path, auth, opened))
    start = messages[0][0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    boundary = dict(start["headers"])[b"content-type"].decode().split("boundary=")[1]
    heads = [n for m, n in messages if m.get("body", b"").startswith(f"--{boundary}\r\n".encode())]
    assert heads == list(range(BIG))  # k files opened when the (k+1)-th part begins
    assert len(opened) == BIG
    body = b"".join(m.get("body", b"") for m, _ in messages)
    assert len(parse(body, f'multipart/related; type="{DICOM}"; boundary={boundary}')[1]) == BIG


async def _asgi_get(app, path: str, headers: dict, opened: list) -> list[tuple[dict, int]]:  # noqa: ANN001
    """GET `path` from an ASGI app; each message sent with how many files were open by then."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    requested = False
    finished = asyncio.Event()
    messages: list[tuple[dict, int]] = []

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append((message, len(opened)))

    await app(scope, receive, send)
    finished.set()
    return messages


def test_searches_frames_and_renderings_are_audited_without_names(web: dict) -> None:
    client = _client(web)
    assert [
        _value(d, "0020000D")
        for d in client.search_for_studies(search_filters={"PatientName": "ROE*"})
    ] == [STUDY_B]
    client.search_for_series(STUDY_A)
    client.search_for_instances(search_filters={"PatientID": "PID-1"}, limit=2)
    searches = _audit(web["db"], "dicomweb.searched")
    assert [(e.actor, e.study_uid, e.detail["level"]) for e in searches] == [
        ("dicomweb:rad", None, "STUDY"),
        ("dicomweb:rad", STUDY_A, "SERIES"),
        ("dicomweb:rad", None, "INSTANCE"),
    ]
    by_name, in_study, instances = (e.detail for e in searches)
    assert by_name["studies"] == [STUDY_B] and by_name["matches"] == 1
    assert "PatientName" in by_name["params"]
    assert in_study["studies"] == [STUDY_A] and in_study["matches"] == 2
    assert instances["studies"] == [STUDY_A] and instances["matches"] == 2
    assert instances["more"] is True  # PID-1 has four instances: a page of two
    text = json.dumps([e.detail for e in searches])
    for identifying in ("ROE", "RICHARD", "DOE", "PID-1", "PID-2"):
        assert identifying not in text  # values of the query are never kept

    sop = pydicom.dcmread(web["files"][1]).SOPInstanceUID
    client.retrieve_instance_frames(STUDY_A, SERIES_A, sop, frame_numbers=[1])
    client.retrieve_instance_rendered(STUDY_A, SERIES_A, sop, media_types=("image/png",))
    headers = {"Authorization": f"Bearer {web['tokens']['rad']}", "Accept": "image/png"}
    thumb = requests.get(f"{web['url']}/studies/{STUDY_B}/thumbnail", headers=headers, timeout=30)
    assert thumb.status_code == 200
    reads = [e for e in _audit(web["db"], "dicomweb.retrieved")]
    assert [(e.study_uid, e.detail["what"], e.detail["instance"]) for e in reads] == [
        (STUDY_A, "frames", sop),
        (STUDY_A, "rendered", sop),
        (STUDY_B, "thumbnail", None),
    ]
    assert reads[0].detail["frames"] == 1 and reads[1].detail["rendered"] == sop
    b_sop = pydicom.dcmread(web["files"][4]).SOPInstanceUID
    assert reads[2].detail["rendered"] == b_sop  # the study's image that stood for it

    # A refused retrieval (406) is not a retrieval: nothing more is audited as one.
    bad = requests.get(
        f"{web['url']}/studies/{STUDY_A}/series/{SERIES_A}/instances/{sop}/frames/1",
        headers={**headers, "Accept": 'multipart/related; type="image/jpeg"'},
        timeout=30,
    )
    assert bad.status_code == 406
    assert len(_audit(web["db"], "dicomweb.retrieved")) == 3

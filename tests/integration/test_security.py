"""The node's transport security against dcmtk's storescu/echoscu: DICOM over TLS with client
certificates checked against a CA, plain and uncertified clients refused, an IP allow-list that
rejects and audits associations from other addresses, and logs free of patient identifiers.

The test PKI (a CA, a server certificate for localhost/127.0.0.1, a client certificate, and a
client certificate from an unrelated CA) is made with the openssl command in a temporary folder.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from db import audit
from db.session import Database
from dicom_node import tls
from dicom_node.server import address_allowed, parse_networks
from radai.settings import Settings
from tests.conftest import ECHOSCU, echoscu, storescu, wait_for
from tests.helpers import failures, instances

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate that chains to another CA
    rogue_key: Path
    encrypted_key: Path  # the server key under a passphrase


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def _issue(folder: Path, name: str, ca: tuple[Path, Path], subject: str, ext: str) -> None:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    extfile = folder / f"{name}.ext"
    extfile.write_text(ext)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extfile),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not Path(OPENSSL).exists():
        pytest.fail("the openssl command is missing (Debian package openssl)")
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "radai-test-ca")
    rogue_ca = _make_ca(d, "someone-else-ca")
    _issue(
        d,
        "server",
        ca,
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n",
    )
    client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
    _issue(d, "client", ca, "/CN=STORESCU", client_ext)
    _issue(d, "rogue", rogue_ca, "/CN=STORESCU", client_ext)
    _openssl(
        "pkey", "-in", str(d / "server.key"), "-aes256", "-passout", "pass:secret",
        "-out", str(d / "encrypted.key"),
    )  # fmt: skip
    return Pki(
        ca=ca[1],
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.crt",
        rogue_key=d / "rogue.key",
        encrypted_key=d / "encrypted.key",
    )


def _tls_node(node_factory, db: Database, pki: Pki, *, ca: bool = True, **config):  # noqa: ANN001, ANN202
    return node_factory(
        db,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca if ca else None,
        **config,
    )


def _client_tls(pki: Pki, *, cert: Path | None = None, key: Path | None = None) -> tuple[str, ...]:
    # dcmtk 3.6.7 defaults: BCP 195 non-downgrading profile, server certificate verified (-rc).
    # -pw: an empty key password instead of a prompt on stdin.
    cert, key = cert or pki.client_cert, key or pki.client_key
    return ("+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca))


def _tls_echoscu(port: int, extra: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ECHOSCU, "-v", "-aet", "ECHOSCU", "-aec", "RADAI", *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _refused_associations(db: Database) -> list[audit.AuditEntry]:
    with db.session() as s:
        return list(
            s.execute(
                select(audit.AuditEntry)
                .where(audit.AuditEntry.action == "association.refused")
                .order_by(audit.AuditEntry.seq)
            ).scalars()
        )


def test_store_over_tls_with_client_certificate_is_recorded(
    database, node_factory, samples, pki, caplog
):
    caplog.set_level(logging.INFO, logger="radai.node")
    node = _tls_node(node_factory, database, pki)
    files = samples["lung1"][:3]
    result = storescu(node.port, files, extra=_client_tls(pki))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    held = instances(database)
    assert sorted(i.sop_instance_uid for i in held) == sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    )
    assert all(i.calling_ae == "STORESCU" for i in held)
    connected = [r.getMessage() for r in caplog.records if "TLS connection from" in r.message]
    assert connected and "commonName=STORESCU" in connected[0]
    assert "TLSv1.2" in connected[0] or "TLSv1.3" in connected[0]


def test_plain_connections_to_the_tls_port_fail_and_store_nothing(
    sqlite_db, node_factory, samples, pki, caplog
):
    caplog.set_level(logging.INFO, logger="radai.node")
    node = _tls_node(node_factory, sqlite_db, pki)
    assert storescu(node.port, samples["lung1"][:2]).returncode != 0
    assert echoscu(node.port).returncode != 0
    assert instances(sqlite_db) == [] and failures(sqlite_db) == []
    assert any("TLS handshake with 127.0.0.1" in r.message for r in caplog.records)
    # The failures leave the node serving TLS clients.
    assert _tls_echoscu(node.port, _client_tls(pki)).returncode == 0


def test_client_certificate_is_required_and_checked_against_the_ca(
    sqlite_db, node_factory, samples, pki
):
    node = _tls_node(node_factory, sqlite_db, pki)
    anonymous = ("+tla", "+cf", str(pki.ca))
    assert storescu(node.port, samples["lung1"][:1], extra=anonymous).returncode != 0
    assert _tls_echoscu(node.port, anonymous).returncode != 0
    rogue = _client_tls(pki, cert=pki.rogue_cert, key=pki.rogue_key)
    assert storescu(node.port, samples["lung1"][:1], extra=rogue).returncode != 0
    assert instances(sqlite_db) == []
    assert _tls_echoscu(node.port, _client_tls(pki)).returncode == 0


def test_without_a_ca_tls_clients_need_no_certificate(sqlite_db, node_factory, pki):
    node = _tls_node(node_factory, sqlite_db, pki, ca=False)
    assert _tls_echoscu(node.port, ("+tla", "+cf", str(pki.ca))).returncode == 0
    assert echoscu(node.port).returncode != 0  # still TLS only


def test_failed_or_stalled_handshakes_do_not_block_other_senders(sqlite_db, node_factory, pki):
    node = _tls_node(node_factory, sqlite_db, pki, max_associations=2)
    # More failed handshakes than association slots: each must give its slot back at once.
    for _ in range(4):
        assert echoscu(node.port).returncode != 0
    # A client that connects and says nothing must not hold up the accept loop.
    with socket.create_connection(("127.0.0.1", node.port)):
        time.sleep(0.3)
        started = time.monotonic()
        result = _tls_echoscu(node.port, _client_tls(pki))
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 10, f"echo took {elapsed:.1f} s behind a silent client"


def test_address_outside_allowed_networks_is_rejected_and_audited(database, node_factory, samples):
    node = node_factory(database, allowed_networks=["10.0.0.0/8"])
    result = echoscu(node.port)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert storescu(node.port, samples["lung1"][:1]).returncode != 0
    assert instances(database) == []

    # The A-ASSOCIATE-RJ goes out before the audit entry is committed: wait for it.
    wait_for(lambda: len(_refused_associations(database)) >= 2, timeout=10)
    refused = _refused_associations(database)
    assert len(refused) == 2
    first = refused[0]
    assert first.actor == "node:RADAI"
    assert first.detail["peer"].startswith("127.0.0.1:")
    assert first.detail["calling_ae"] == "ECHOSCU"
    assert "allowed networks" in first.detail["reason"]
    assert refused[1].detail["calling_ae"] == "STORESCU"
    with database.session() as s:
        assert audit.verify(s).ok


def test_address_inside_allowed_networks_is_served(database, node_factory, samples):
    node = node_factory(database, allowed_networks=["10.0.0.0/8", "127.0.0.0/8"])
    assert echoscu(node.port).returncode == 0
    assert storescu(node.port, samples["lung1"][:1]).returncode == 0
    assert len(instances(database)) == 1
    assert _refused_associations(database) == []


def test_allow_list_applies_to_tls_clients_too(sqlite_db, node_factory, pki):
    node = _tls_node(node_factory, sqlite_db, pki, allowed_networks=["192.168.0.0/16"])
    result = _tls_echoscu(node.port, _client_tls(pki))
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    wait_for(lambda: _refused_associations(sqlite_db), timeout=10)
    assert len(_refused_associations(sqlite_db)) == 1


def test_logs_of_a_normal_store_name_no_patient(sqlite_db, node_factory, samples, pki, caplog):
    caplog.set_level(logging.DEBUG)
    files = samples["lung2"][:3]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    name, patient_id = str(header.PatientName), str(header.PatientID)
    assert name and patient_id
    node = _tls_node(node_factory, sqlite_db, pki, allowed_networks=["127.0.0.0/8"])
    assert storescu(node.port, files, extra=_client_tls(pki)).returncode == 0
    assert storescu(node.port, files, extra=_client_tls(pki)).returncode == 0  # duplicates
    assert len(instances(sqlite_db)) == 3
    text = caplog.text
    assert "TLS connection from 127.0.0.1" in text  # the capture did see the node's log lines
    for needle in (name, patient_id, name.replace("^", " "), name.split("^")[-1]):
        assert needle not in text, f"patient identifier {needle!r} in the log"


def test_networks_parse_and_match() -> None:
    nets = parse_networks(["10.0.0.0/8", " 192.168.1.7/24 ", "2001:db8::/32", "172.16.0.9"])
    assert [str(n) for n in nets] == [
        "10.0.0.0/8",
        "192.168.1.0/24",
        "2001:db8::/32",
        "172.16.0.9/32",
    ]
    assert address_allowed("10.200.3.4", nets)
    assert address_allowed("::ffff:192.168.1.200", nets)  # IPv4 peer on a dual-stack socket
    assert address_allowed("2001:db8::1", nets)
    assert not address_allowed("172.16.0.10", nets)
    assert not address_allowed("127.0.0.1", nets)
    assert not address_allowed("not-an-address", nets)
    assert address_allowed("203.0.113.9", [])  # empty list: any address
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        parse_networks(["10.0.0.0/33"])


def test_encrypted_or_missing_keys_fail_clearly(pki, tmp_path) -> None:
    with pytest.raises(tls.TLSConfigError, match="encrypted"):
        tls.server_context(pki.server_cert, pki.encrypted_key)
    with pytest.raises(tls.TLSConfigError, match="missing.key"):
        tls.server_context(pki.server_cert, tmp_path / "missing.key")
    with pytest.raises(tls.TLSConfigError, match="CA"):
        tls.server_context(pki.server_cert, pki.server_key, tmp_path / "missing-ca.crt")
    ctx = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    assert ctx.minimum_version >= tls.MINIMUM_VERSION


def test_settings_check_tls_and_networks(tmp_path, pki, monkeypatch) -> None:
    monkeypatch.setenv("RADAI_HOME", str(tmp_path / "home"))
    with pytest.raises(ValidationError, match="RADAI_TLS_REQUIRED"):
        Settings(tls_required=True)
    with pytest.raises(ValidationError, match="together"):
        Settings(tls_cert=str(pki.server_cert))
    with pytest.raises(ValidationError, match="RADAI_TLS_CA"):
        Settings(tls_ca=str(pki.ca))
    with pytest.raises(ValidationError, match="CIDR"):
        Settings(allowed_networks="10.0.0.0/8, intranet")

    monkeypatch.setenv("RADAI_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("RADAI_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("RADAI_TLS_CA", str(pki.ca))
    monkeypatch.setenv("RADAI_TLS_REQUIRED", "true")
    monkeypatch.setenv("RADAI_ALLOWED_NETWORKS", "10.0.0.0/8, 127.0.0.1")
    from radai.cli import _node_service

    config = _node_service(Settings()).node.config
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (
        pki.server_cert,
        pki.server_key,
        pki.ca,
    )
    assert config.allowed_networks == ["10.0.0.0/8", "127.0.0.1"]

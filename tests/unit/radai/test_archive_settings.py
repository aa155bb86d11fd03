"""RADAI_ARCHIVE_* settings: the token from the variable or a file, TLS verification choices."""

from __future__ import annotations

from pathlib import Path

from radai.settings import Settings


def test_the_token_comes_from_the_variable_first_then_the_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    assert Settings(archive_token_file=str(token)).archive_bearer == "from-file"
    assert Settings(archive_token="direct", archive_token_file=str(token)).archive_bearer == (
        "direct"
    )
    assert Settings().archive_bearer == ""


def test_tls_verification_is_on_unless_turned_off_or_given_a_ca(tmp_path: Path) -> None:
    assert Settings().archive_tls_verify is True
    assert Settings(archive_verify="false").archive_tls_verify is False
    ca = tmp_path / "ca.pem"
    assert Settings(archive_verify=str(ca)).archive_tls_verify == str(ca)


def test_the_worker_config_carries_the_archive(tmp_path: Path) -> None:
    from radai.cli import _worker_config

    config = _worker_config(
        Settings(home=tmp_path, archive_url="http://node:8080/dicomweb", archive_cache_mb=8)
    )
    archive = config.archive()
    assert archive is not None and archive.url == "http://node:8080/dicomweb"
    assert archive.cache.max_bytes == 8 * 1024 * 1024
    assert _worker_config(Settings(home=tmp_path)).archive() is None

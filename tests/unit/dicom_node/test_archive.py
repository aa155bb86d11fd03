"""The archive writes whole files or nothing, and cleans what a crash left."""

from __future__ import annotations

import os

import pytest

from dicom_node.archive import Archive, sha256, write_durably


def test_write_durably_replaces_atomically(tmp_path):
    target = tmp_path / "a" / "b" / "x.dcm"
    write_durably(target, b"first")
    write_durably(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "x.dcm"

    def boom(fd):  # noqa: ANN001
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_durably(target, b"data")
    assert list(tmp_path.iterdir()) == []


def test_remove_partials_and_quarantine_naming(tmp_path):
    archive = Archive(tmp_path / "archive", tmp_path / "quarantine")
    leftover = tmp_path / "archive" / "1.2" / ".x.dcm.abc.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    assert archive.remove_partials() == 1 and not leftover.exists()
    kept = archive.keep_refused(b"../../evil")
    assert kept.parent.parent == tmp_path / "quarantine"
    assert kept.name == f"{sha256(b'../../evil')}.dcm"
    assert archive.keep_refused(b"../../evil") == kept

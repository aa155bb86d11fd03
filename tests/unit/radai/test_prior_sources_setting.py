"""RADAI_PRIOR_SOURCES: PACS nodes searched for priors, parsed like RADAI_EXPORT_TO and passed to
the worker with the prior cache under RADAI_HOME; a typo is refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from radai.cli import _worker_config
from radai.settings import Settings


def test_sources_reach_the_worker_with_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RADAI_HOME", str(tmp_path))
    monkeypatch.setenv("RADAI_PRIOR_SOURCES", "PACS@pacs.example:104, OLD@10.0.0.5:11112")
    monkeypatch.setenv("RADAI_PRIOR_CACHE_MB", "100")
    config = _worker_config(Settings())
    assert config.prior_sources == [("PACS", "pacs.example", 104), ("OLD", "10.0.0.5", 11112)]
    assert config.prior_cache_mb == 100.0
    assert config.prior_cache_dir == tmp_path.resolve() / "prior-cache"


def test_no_sources_by_default(monkeypatch):
    monkeypatch.delenv("RADAI_PRIOR_SOURCES", raising=False)
    assert Settings().prior_destinations == []


def test_a_source_that_is_no_destination_is_refused(monkeypatch):
    monkeypatch.setenv("RADAI_PRIOR_SOURCES", "PACS@pacs.example")
    with pytest.raises(ValidationError, match="PACS@pacs.example"):
        Settings()

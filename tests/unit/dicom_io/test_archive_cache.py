"""The WADO-RS series cache: fetched once, bounded by size with least recently used eviction, and
never hands out a damaged or half-written file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_io.archive import ArchiveError, SeriesCache


class Archive:
    """A fake WADO-RS source of series: counts fetches."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.fetches: list[str] = []

    def fetcher(self, series: str, sops: list[str]):  # noqa: ANN201
        def fetch():  # noqa: ANN202
            self.fetches.append(series)
            for sop in sops:
                yield sop, (sop.encode() * self.size)[: self.size]

        return fetch


def sops(series: str, n: int = 3) -> list[str]:
    return [f"{series}.{i}" for i in range(1, n + 1)]


def get(cache: SeriesCache, archive: Archive, series: str, n: int = 3) -> dict[str, Path]:
    uids = sops(series, n)
    return cache.series("1.2.3", series, uids, archive.fetcher(series, uids))


def test_a_series_is_fetched_once_then_served_from_disk(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path, 100_000), Archive()
    first = get(cache, archive, "1.5")
    second = get(cache, archive, "1.5")
    assert archive.fetches == ["1.5"]
    assert first == second and set(first) == set(sops("1.5"))
    assert all(p.read_bytes().startswith(b"1.5.") for p in first.values())


def test_the_cache_stays_within_its_bound_evicting_least_recently_used(tmp_path: Path) -> None:
    # Room for two series of 3 x 1000 bytes, not three.
    cache, archive = SeriesCache(tmp_path, 6_500), Archive()
    get(cache, archive, "1.1")
    get(cache, archive, "1.2")
    _age(tmp_path / "1.2.3" / "1.1", 100)
    _age(tmp_path / "1.2.3" / "1.2", 200)
    get(cache, archive, "1.1")  # used again: now the most recent
    get(cache, archive, "1.3")
    assert cache.size() <= 6_500
    assert not (tmp_path / "1.2.3" / "1.2").exists(), "the least recently used series stays"
    get(cache, archive, "1.1")
    get(cache, archive, "1.3")
    assert archive.fetches == ["1.1", "1.2", "1.3"]
    get(cache, archive, "1.2")
    assert archive.fetches[-1] == "1.2"


def test_a_series_larger_than_the_bound_is_still_handed_out_whole(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path, 2_500), Archive()
    get(cache, archive, "1.1")
    files = get(cache, archive, "1.2", n=4)
    assert all(p.exists() for p in files.values())
    assert not (tmp_path / "1.2.3" / "1.1").exists()


def test_a_damaged_file_is_fetched_again_not_reused(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path, 100_000), Archive()
    files = get(cache, archive, "1.5")
    victim = files["1.5.2"]
    victim.write_bytes(victim.read_bytes()[:300])  # cut short, name kept
    again = get(cache, archive, "1.5")
    assert archive.fetches == ["1.5", "1.5"]
    assert len(again["1.5.2"].read_bytes()) == 1000


def test_a_partial_file_left_by_a_crash_is_removed_and_never_served(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path, 100_000), Archive()
    folder = tmp_path / "1.2.3" / "1.5"
    folder.mkdir(parents=True)
    partial = folder / ".1.5.1-abc.dcm.deadbeef.partial"
    partial.write_bytes(b"half")
    files = get(cache, archive, "1.5")
    assert not partial.exists()
    assert archive.fetches == ["1.5"]
    assert all(p.suffix == ".dcm" and ".partial" not in p.name for p in files.values())


def test_a_fetch_that_dies_midway_leaves_no_file_under_a_final_name(tmp_path: Path) -> None:
    cache = SeriesCache(tmp_path, 100_000)

    def dying():  # noqa: ANN202
        yield "1.5.1", b"x" * 10
        raise ConnectionError("reset by peer")

    with pytest.raises(ConnectionError):
        cache.series("1.2.3", "1.5", ["1.5.1", "1.5.2"], dying)
    archive = Archive()
    files = get(cache, archive, "1.5", n=2)
    # The first instance was whole and is reused; the series is fetched again for the second.
    assert archive.fetches == ["1.5"] and len(files) == 2


def test_instances_the_archive_lacks_are_an_error(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path, 100_000), Archive()
    with pytest.raises(ArchiveError, match="lacks 1 of"):
        cache.series("1.2.3", "1.5", [*sops("1.5"), "1.5.9"], archive.fetcher("1.5", sops("1.5")))


def test_uids_cannot_escape_the_cache(tmp_path: Path) -> None:
    cache, archive = SeriesCache(tmp_path / "c", 100_000), Archive()
    with pytest.raises(ValueError):
        cache.series("..", "1.5", ["1"], archive.fetcher("1.5", ["1"]))
    with pytest.raises(ValueError):
        cache.series("1.2", "a/b", ["1"], archive.fetcher("1.5", ["1"]))


def _age(folder: Path, seconds_ago: float) -> None:
    for path in folder.iterdir():
        st = path.stat()
        os.utime(path, (st.st_atime - seconds_ago, st.st_mtime - seconds_ago))

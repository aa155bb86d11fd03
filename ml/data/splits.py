"""Splits by patient, never by sample: LIDC patients into train / validation / test, and
leave-one-anatomy-out folds of the background CTs.

A patient's split depends only on its ID: the first 8 bytes of SHA-256(`SPLIT_KEY` + ID) as a
number in [0, 1) below `TEST_FRACTION` is test, below `TEST_FRACTION + VALIDATION_FRACTION` is
validation, else train. Adding or removing patients never moves another patient. The split of the
patients at hand is committed in `lidc_split.json` (patient IDs only) so that a change of this code
shows up as a diff.

The test patients are for the final evaluation only: no recipe, threshold or model choice may look
at them. :func:`lidc_split` refuses to return them unless called with
``purpose="final-evaluation"``. Imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

SPLIT_KEY = "radai-lidc-split-v1"
TEST_FRACTION = 0.25
VALIDATION_FRACTION = 0.15
SPLIT_FILE = Path(__file__).with_name("lidc_split.json")
FINAL_EVALUATION = "final-evaluation"
Part = Literal["train", "validation", "test"]


def split_of(patient_id: str) -> Part:
    """The split of one patient, from a keyed hash of its ID."""
    digest = hashlib.sha256(f"{SPLIT_KEY}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VALIDATION_FRACTION:
        return "validation"
    return "train"


def make_split(patient_ids: Iterable[str]) -> dict[str, list[str]]:
    """Sorted patient IDs per split (each ID once)."""
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for pid in sorted(set(patient_ids)):
        out[split_of(pid)].append(pid)
    return out


def write_split(patient_ids: Iterable[str], path: Path = SPLIT_FILE) -> dict[str, list[str]]:
    """Write :func:`make_split` of ``patient_ids`` as the committed JSON file."""
    split = make_split(patient_ids)
    doc = {
        "key": SPLIT_KEY,
        "fractions": {"test": TEST_FRACTION, "validation": VALIDATION_FRACTION},
        "note": "LIDC-IDRI patient IDs only; test is for the final evaluation only",
        **split,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return split


def lidc_split(part: Part, *, purpose: str | None = None, path: Path = SPLIT_FILE) -> list[str]:
    """Patient IDs of one part of the committed split. ``"test"`` needs
    ``purpose="final-evaluation"``: anything else raises PermissionError."""
    if part not in ("train", "validation", "test"):
        raise ValueError(f"unknown split part {part!r}")
    if part == "test" and purpose != FINAL_EVALUATION:
        raise PermissionError(
            "the LIDC test patients are for the final evaluation only; "
            f'call lidc_split("test", purpose="{FINAL_EVALUATION}") there and nowhere else'
        )
    doc = json.loads(path.read_text())
    if doc.get("key") != SPLIT_KEY:
        raise ValueError(f"{path} was made with another split key")
    return list(doc[part])


def rows_in(rows: Iterable, part: Part, *, purpose: str | None = None, path: Path = SPLIT_FILE):
    """The rows (anything with ``patient_id``) of the patients of ``part``."""
    wanted = set(lidc_split(part, purpose=purpose, path=path))
    return [r for r in rows if r.patient_id in wanted]


def anatomy_folds(names: Sequence[str]) -> Iterator[tuple[list[str], str]]:
    """Leave-one-anatomy-out: for each background name, (the others, the held-out one)."""
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError("need at least two distinct background names")
    for held_out in names:
        yield [n for n in names if n != held_out], held_out

"""QIDO-RS queries (PS3.18 8.3.4, 10.6): the query string parsed into matching keys, the
attribute matching of PS3.4 C.2.2.2 on a dataset, and which attributes an answer carries.

Matching kinds: single value (exact, case-sensitive), UID list (comma or backslash separated),
wildcard (`*` and `?`, not for UIDs, dates and times), range (`a-b`, `-b`, `a-` for DA, TM and
DT) and universal (an empty value: the attribute is only returned). A multi-valued attribute
matches when one of its values does. Fuzzy matching of person names (`fuzzymatching=true`:
case-insensitive, each name component matched at its start) is off unless a request asks.
Nested keys (sequence matching) are refused with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from dicomweb.errors import bad_request

STUDY, SERIES, INSTANCE = "STUDY", "SERIES", "INSTANCE"
MAX_LIMIT = 1000  # a page is never larger, whatever `limit` asks
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


def _tags(*keywords: str) -> tuple[int, ...]:
    return tuple(int(tag_for_keyword(k) or 0) for k in keywords)


# Attributes every answer carries at its level (PS3.18 table 10.6.3-3, those radai can give).
STUDY_FIELDS = _tags(
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_FIELDS = _tags(
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_FIELDS = _tags(
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# The identifying attributes of the levels above, added when a search spans them
# (e.g. /series returns each series' study attributes too; /studies/{uid}/series only the UID).
_UP = {STUDY: STUDY_FIELDS, SERIES: SERIES_FIELDS}


@dataclass(frozen=True)
class Key:
    tag: int
    vr: str
    value: str


@dataclass
class Query:
    keys: list[Key] = field(default_factory=list)
    include_all: bool = False
    include: set[int] = field(default_factory=set)
    limit: int = MAX_LIMIT
    offset: int = 0
    fuzzy: bool = False

    def value(self, keyword: str) -> str | None:
        """The (non-empty) matching value given for `keyword`, if any."""
        tag = tag_for_keyword(keyword)
        for key in self.keys:
            if key.tag == tag and key.value:
                return key.value
        return None


def parse_tag(name: str) -> int:
    """A keyword (`PatientName`) or eight hex digits (`00100010`) as a tag; 400 otherwise."""
    if "." in name:
        raise bad_request(f"sequence matching is not supported: {name!r}")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
        if keyword_for_tag(tag) == "" and not _is_private(tag):
            raise bad_request(f"unknown attribute {name!r}")
        return tag
    found = tag_for_keyword(name)
    if found is None:
        raise bad_request(f"unknown attribute or query parameter {name!r}")
    return int(found)


def _is_private(tag: int) -> bool:
    return bool((tag >> 16) & 1)


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _int_param(params: Sequence[tuple[str, str]], name: str, default: int) -> int:
    values = [v for k, v in params if k == name]
    if not values:
        return default
    if len(values) > 1:
        raise bad_request(f"{name} given more than once")
    try:
        number = int(values[0])
    except ValueError:
        raise bad_request(f"{name} must be a non-negative integer, not {values[0]!r}") from None
    if number < 0:
        raise bad_request(f"{name} must be a non-negative integer, not {values[0]!r}")
    return number


def parse_query(params: Sequence[tuple[str, str]]) -> Query:
    """The query string's (name, value) pairs as a `Query`; `HttpError` 400 with the reason."""
    query = Query()
    query.limit = min(_int_param(params, "limit", MAX_LIMIT), MAX_LIMIT)
    query.offset = _int_param(params, "offset", 0)
    for name, value in params:
        if name == "includefield":
            for part in filter(None, (p.strip() for p in value.split(","))):
                if part == "all":
                    query.include_all = True
                else:
                    query.include.add(parse_tag(part))
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise bad_request(f"fuzzymatching must be true or false, not {value!r}")
            query.fuzzy = value == "true"
        elif name not in RESERVED:
            tag = parse_tag(name)
            vr = _vr(tag)
            if vr == "SQ":
                raise bad_request(f"sequence matching is not supported: {name!r}")
            if vr in RANGE_VRS and value.count("-") > 1 and vr != "DT":
                raise bad_request(f"not a range: {name}={value!r}")
            query.keys.append(Key(tag, vr, value))
    return query


# Matching ------------------------------------------------------------------------------------


def _values(ds: Dataset, tag: int) -> list[str]:
    element = ds.get(tag)
    if element is None or element.value is None or element.value == "":
        return []
    value = element.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value).strip()] if str(value).strip() else []


def _wildcard(pattern: str, value: str, *, fold: bool = False) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL if fold else re.DOTALL) is not None


def _fuzzy_name(pattern: str, value: str) -> bool:
    """Each ^-separated component of the pattern starts the value's component, ignoring case."""
    wanted = [p.strip().lower() for p in pattern.replace("*", "").split("^")]
    have = [p.strip().lower() for p in value.split("^")]
    return all(
        not w or (i < len(have) and have[i].startswith(w)) for i, w in enumerate(wanted)
    ) or _wildcard(pattern, value, fold=True)


def _in_range(spec: str, value: str) -> bool:
    # DA, TM and DT values order as text; a bound compares with the value's same-length prefix.
    low, _, high = spec.partition("-")
    if low and value[: len(low)] < low:
        return False
    return not (high and value[: len(high)] > high)


def _number_equal(spec: str, value: str) -> bool:
    try:
        return float(spec) == float(value)
    except ValueError:
        return spec == value


def key_matches(key: Key, ds: Dataset, *, fuzzy: bool = False) -> bool:
    """Whether `ds` matches one key (PS3.4 C.2.2.2); an empty key matches everything."""
    if key.value == "":
        return True
    return values_match(key, _values(ds, key.tag), fuzzy=fuzzy)


def values_of(ds: Dataset, tag: int) -> list[str]:
    """An attribute's values as matching sees them: text, stripped, empty ones left out."""
    return _values(ds, tag)


def values_match(key: Key, values: Sequence[str], *, fuzzy: bool = False) -> bool:
    """Whether an attribute with `values` (as `values_of` gives them) matches one key."""
    if key.value == "":
        return True
    if not values:
        return False
    spec = key.value
    if key.vr == "UI":
        wanted = {u.strip() for u in re.split(r"[,\\]", spec) if u.strip()}
        return any(v in wanted for v in values)
    if key.vr in RANGE_VRS and "-" in spec:
        return any(_in_range(spec, v) for v in values)
    if key.vr in NUMERIC_VRS:
        options = spec.split(",")
        return any(_number_equal(o.strip(), v) for o in options for v in values)
    if key.vr == "PN" and fuzzy:
        return any(_fuzzy_name(spec, v) for v in values)
    if "*" in spec or "?" in spec:
        return any(_wildcard(spec, v) for v in values)
    options = spec.split("\\") if "\\" in spec else [spec]
    return any(v == o for o in options for v in values)


def matches(keys: Iterable[Key], ds: Dataset, *, fuzzy: bool = False) -> bool:
    return all(key_matches(k, ds, fuzzy=fuzzy) for k in keys)


# Answers -------------------------------------------------------------------------------------


def answer_tags(level: str, query: Query, *, spans: Sequence[str] = ()) -> set[int]:
    """The tags an answer at `level` carries: the level's defaults, those of each level in
    `spans` (a search across studies returns their attributes too), the includefields and the
    matching keys."""
    tags = set({STUDY: STUDY_FIELDS, SERIES: SERIES_FIELDS, INSTANCE: INSTANCE_FIELDS}[level])
    for upper in spans:
        tags |= set(_UP[upper])
    if level != STUDY:
        tags.add(int(tag_for_keyword("StudyInstanceUID") or 0))
    if level == INSTANCE:
        tags.add(int(tag_for_keyword("SeriesInstanceUID") or 0))
    tags |= query.include
    tags |= {k.tag for k in query.keys}
    return tags


def answer(
    source: Dataset, query: Query, tags: set[int], extra: Mapping[str, object] | None = None
) -> dict:
    """The DICOM JSON of one match: `tags` (all of `source`'s non-binary ones with
    includefield=all) from `source`, with `extra` (computed counts, retrieve URL) on top."""
    out = Dataset()
    wanted = None if query.include_all else tags
    for element in source:
        if element.VR in BINARY_VRS or element.tag.is_private:
            continue
        if wanted is None or int(element.tag) in wanted:
            out.add(element)
    for keyword, value in (extra or {}).items():
        if value is not None:
            setattr(out, keyword, value)
    for tag in tags:  # asked for but absent: present and empty, as PS3.18 wants
        if tag not in out and not _is_private(tag):
            vr = _vr(tag)
            if vr not in BINARY_VRS and vr != "SQ":
                out.add_new(tag, vr, None)
    return out.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=None)


def answer_from_json(
    stored: Mapping[str, dict], tags: set[int], extra: Mapping[str, object] | None = None
) -> dict:
    """What `answer` gives, from a stored answer (`answer` of the same header for a set of tags
    that holds `tags`): the DICOM JSON of `tags`, with `extra` on top."""
    out = {k: v for k, v in stored.items() if int(k, 16) in tags}
    top = Dataset()
    for keyword, value in (extra or {}).items():
        if value is not None:
            setattr(top, keyword, value)
    for tag in tags:
        if f"{tag:08X}" not in out and tag not in top and not _is_private(tag):
            vr = _vr(tag)
            if vr not in BINARY_VRS and vr != "SQ":
                top.add_new(tag, vr, None)
    out.update(top.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=None))
    return dict(sorted(out.items()))

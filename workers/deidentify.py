"""De-identification of result objects for research destinations, after the DICOM PS3.15 Annex E
Basic Application Level Confidentiality Profile: identifying attributes are removed, emptied or
replaced at every nesting level, private tags dropped, dates and times replaced by dummies, person
names emptied, and instance UIDs replaced by `2.25.` UIDs derived with HMAC-SHA256 under a secret
salt, so that objects of one study (SEG, SR and the references between them) stay linked while
the originals cannot be recovered without the salt. Not validated for any regulatory purpose.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

METHOD = "radai basic profile (PS3.15 E.1)"
SALT_FILE = "deid-salt"
DICOM_ROOT = "1.2.840.10008."  # UIDs the standard defines identify classes, never patients

# Annex E action X (remove). Applied at every nesting level.
REMOVE = frozenset(
    {
        "AcquisitionComments",
        "AdditionalPatientHistory",
        "AdmissionID",
        "AdmittingDiagnosesCodeSequence",
        "AdmittingDiagnosesDescription",
        "Allergies",
        "BranchOfService",
        "CountryOfResidence",
        "CurrentPatientLocation",
        "DerivationDescription",
        "EthnicGroup",
        "FrameComments",
        "ImagePresentationComments",
        "InstitutionAddress",
        "InstitutionCodeSequence",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "IssuerOfAdmissionID",
        "IssuerOfPatientID",
        "MedicalAlerts",
        "MedicalRecordLocator",
        "MilitaryRank",
        "NameOfPhysiciansReadingStudy",
        "Occupation",
        "OperatorIdentificationSequence",
        "OperatorsName",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAddress",
        "PatientAge",
        "PatientBirthName",
        "PatientBirthTime",
        "PatientComments",
        "PatientInsurancePlanCodeSequence",
        "PatientMotherBirthName",
        "PatientReligiousPreference",
        "PatientSize",
        "PatientState",
        "PatientTelephoneNumbers",
        "PatientWeight",
        "PerformedLocation",
        "PerformedProcedureStepDescription",
        "PerformedProcedureStepID",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformingPhysicianIdentificationSequence",
        "PerformingPhysicianName",
        "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence",
        "PhysiciansReadingStudyIdentificationSequence",
        "PregnancyStatus",
        "ProtocolName",
        "ReferencedPatientSequence",
        "ReferringPhysicianAddress",
        "ReferringPhysicianIdentificationSequence",
        "ReferringPhysicianTelephoneNumbers",
        "RegionOfResidence",
        "RequestAttributesSequence",
        "RequestedProcedureDescription",
        "RequestedProcedureID",
        "RequestingPhysician",
        "RequestingService",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepID",
        "SmokingStatus",
        "SourceApplicationEntityTitle",
        "SpecialNeeds",
        "StationName",
        "StudyComments",
        "StudyDescription",
        "TextComments",
        "TextString",
    }
)
# Annex E action Z (empty): Type 2 attributes that must stay present.
EMPTY = frozenset(
    {
        "AccessionNumber",
        "ContentCreatorName",
        "PatientBirthDate",
        "PatientName",
        "PatientSex",
        "ReferringPhysicianName",
        "StudyID",
    }
)
# Annex E action D (dummy): kept with a pseudonym because the object's IOD needs a value.
PSEUDONYM = frozenset({"DeviceSerialNumber", "PatientID"})
# Free text radai itself writes into its results (disclaimers, algorithm names); Annex E removes
# these, but in an object radai made they carry no patient data and the disclaimer must travel.
OWN_TEXT = frozenset({"ContentDescription", "ImageComments", "SeriesDescription"})
OWN_MANUFACTURER = "radai"
# Person names that are Type 1 where they occur (SR PNAME items, verifying observers).
PN_DUMMY = "ANONYMIZED"
PN_TYPE1 = frozenset({"PersonName", "VerifyingObserverName"})
KEEP_UIDS = frozenset(
    {
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "ContextUID",
        "MappingResourceUID",
        "PrivateCodingSchemeCreatorUID",
        "TransferSyntaxUID",
    }
)
DUMMIES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}


def load_salt(home: Path) -> str:
    """The de-identification secret in `home/deid-salt`, created (mode 0600) on first use.

    Losing or changing this file breaks the link between objects exported before and after.
    """
    path = Path(home) / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            # A hard link never replaces an existing file: of two workers racing here, the
            # first one's salt wins and the other reads it below.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    salt = path.read_text().strip()
    if len(salt) < 32:
        raise ValueError(f"{path} holds no usable salt; remove it to create a new one")
    return salt


def pseudonym_uid(uid: str, salt: str) -> str:
    """`2.25.<int>`: a version-4-shaped UUID from HMAC-SHA256(salt, uid); same input, same UID."""
    digest = hmac.new(salt.encode(), uid.encode(), hashlib.sha256).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def pseudonym_text(value: str, salt: str, prefix: str = "RADAI-") -> str:
    """A short keyed hash of `value`, stable under one salt."""
    return prefix + hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]


def deidentify(ds: Dataset, *, salt: str) -> Dataset:
    """A de-identified copy of `ds` (file meta included); `ds` itself is left unchanged."""
    if not salt:
        raise ValueError("an empty salt would make pseudonyms guessable")
    out = copy.deepcopy(ds)
    own = str(out.get("Manufacturer", "")) == OWN_MANUFACTURER
    _clean(out, salt, own)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = Sequence([code])
    out.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        _clean(meta, salt, own)
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _clean(ds: Dataset, salt: str, own: bool) -> None:
    for elem in list(ds):
        if elem.tag.is_private:
            del ds[elem.tag]
            continue
        keyword = elem.keyword
        if keyword in OWN_TEXT:
            if not own:
                del ds[elem.tag]
        elif keyword in REMOVE or _is_overlay_comment(elem):
            del ds[elem.tag]
        elif keyword in PSEUDONYM:
            if elem.value not in (None, ""):
                elem.value = pseudonym_text(str(elem.value), salt)
        elif keyword in EMPTY:
            elem.value = None if elem.VR == "SQ" else ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, salt, own)
        else:
            _replace_value(elem, salt)


def _is_overlay_comment(elem: DataElement) -> bool:
    # Overlay and curve comments (60xx,4000), (50xx,4000) are repeating groups without keywords.
    return elem.tag.group & 0xFF00 in (0x5000, 0x6000) and elem.tag.element == 0x4000


def _replace_value(elem: DataElement, salt: str) -> None:
    if elem.value in (None, "") or elem.VR not in ("UI", "PN", *DUMMIES):
        return
    if elem.VR == "PN":
        elem.value = PN_DUMMY if elem.keyword in PN_TYPE1 else ""
    elif elem.VR in DUMMIES:
        dummy = DUMMIES[elem.VR]
        multi = isinstance(elem.value, MultiValue)
        elem.value = [dummy] * len(elem.value) if multi else dummy
    elif isinstance(elem.value, MultiValue):
        elem.value = [_uid(elem.keyword, str(v), salt) for v in elem.value]
    else:
        elem.value = _uid(elem.keyword, str(elem.value), salt)


def _uid(keyword: str, uid: str, salt: str) -> str:
    # Class, syntax and coding-scheme UIDs name kinds of things, not the patient's objects.
    if not uid or uid.startswith(DICOM_ROOT) or keyword.endswith("ClassUID"):
        return uid
    if keyword in KEEP_UIDS:
        return uid
    return pseudonym_uid(uid, salt)


def deidentify_file(source: Path, target: Path, *, salt: str) -> None:
    """Write a de-identified copy of the Part 10 file `source` to `target`."""
    ds = pydicom.dcmread(source)
    deidentify(ds, salt=salt).save_as(target, enforce_file_format=True)

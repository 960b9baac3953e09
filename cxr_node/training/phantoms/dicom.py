"""Encoding a phantom as a realistic CR or DX DICOM data set: :func:`phantom_to_dataset` and the modules it fills."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from cxr_node.training.phantoms.anatomy import PHANTOM_VERSION, Array, Phantom, _check_int

MANUFACTURER: Final = "cxr-node phantoms"
"""Manufacturer (0008,0070) of phantom files; deliberately not the node's own output marker."""

CR_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.1.1")
_SOP_CLASSES: Final = {"CR": CR_IMAGE_STORAGE, "DX": DX_PRESENTATION_STORAGE}
_PHOTOMETRICS: Final = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class _Ids:
    """The identifiers and times of one instance, all derived from the phantom unless given."""

    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_id: str
    when: datetime


def phantom_to_dataset(
    ph: Phantom,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    accession_number: str | None = None,
    study_datetime: datetime | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    view_position: str = "PA",
    body_part: str = "CHEST",
) -> Dataset:
    """Encode a phantom as a CR Image Storage or DX Image Storage For Presentation instance.

    The label is not written anywhere in the data set: a real radiograph does not carry one.

    Parameters
    ----------
    ph : Phantom
        The image to encode.
    modality : {"CR", "DX"}
        CR Image Storage (1.2.840.10008.5.1.4.1.1.1) or DX For Presentation (1.2.840.10008.5.1.4.1.1.1.1).
    photometric : {"MONOCHROME1", "MONOCHROME2"}
        In MONOCHROME1 high attenuation is stored as low values.
    bits_stored : int
        10 to 16; Bits Allocated is 16, pixels unsigned and spanning ``0 .. 2**bits_stored - 1``.
    patient_id, patient_name : str
        Patient ID (LO) and Patient's Name (PN, e.g. ``"PHANTOM^P00001"``).
    study_uid, accession_number, study_datetime : optional
        Derived from ``ph.seed`` and ``patient_id`` when None.
    series_number, instance_number : int
        Positive.
    view_position, body_part : str
        View Position and Body Part Examined.

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta (Explicit VR Little Endian); the same arguments give the same UIDs and bytes.

    Raises
    ------
    ValueError
        If an argument is out of range, naming the argument, what was expected and what was found.
    """
    _check_dicom_args(modality, photometric, bits_stored, patient_id, series_number, instance_number)
    pixels = _stored_pixels(ph.image, photometric, bits_stored)
    ids = _identifiers(
        ph,
        (modality, photometric, bits_stored),
        patient_id,
        study_uid,
        accession_number,
        study_datetime,
        series_number,
        instance_number,
    )
    ds = Dataset()
    _patient_study(ds, ph, ids, patient_id, patient_name)
    _series_equipment(ds, modality, ids, series_number, view_position, body_part)
    _image(ds, ph, ids, pixels, photometric, bits_stored, instance_number)
    if modality == "DX":
        _dx_specific(ds, photometric)
    ds.file_meta = _file_meta(ds)
    return ds


def _check_dicom_args(modality: str, photometric: str, bits: int, patient_id: str, series: int, instance: int) -> None:
    """Raise ValueError for an out-of-range argument of :func:`phantom_to_dataset`."""
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality: expected one of {tuple(_SOP_CLASSES)}, found {modality!r}")
    if photometric not in _PHOTOMETRICS:
        raise ValueError(f"photometric: expected one of {_PHOTOMETRICS}, found {photometric!r}")
    _check_int("bits_stored", bits, 10, 16)
    _check_int("series_number", series, 1, None)
    _check_int("instance_number", instance, 1, None)
    if not isinstance(patient_id, str) or not 0 < len(patient_id) <= 64 or "\\" in patient_id:
        raise ValueError(f"patient_id: expected 1-64 characters without a backslash, found {patient_id!r}")


def _stored_pixels(image: Array, photometric: str, bits: int) -> NDArray[np.uint16]:
    """Quantise ``image`` (0..1, high = attenuating) to ``bits``; invert for MONOCHROME1."""
    top = (1 << bits) - 1
    values = np.rint(image * np.float32(top)).astype(np.uint16)
    result: NDArray[np.uint16] = top - values if photometric == "MONOCHROME1" else values
    return result


def _hash_int(*parts: object) -> int:
    """Return a stable non-negative integer from ``parts`` (SHA-256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def _uid(*parts: object) -> str:
    """Return a UUID-derived UID (``2.25.<name-based UUID>``, PS3.5 B.2) from ``parts``.

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy and returns a random
    UUID (pydicom 3.0), hence a version 5 UUID over the parts instead.
    """
    name = "\x1f".join([MANUFACTURER, PHANTOM_VERSION, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _identifiers(
    ph: Phantom,
    style: tuple[str, str, int],
    patient_id: str,
    study_uid: str | None,
    accession: str | None,
    when: datetime | None,
    series: int,
    instance: int,
) -> _Ids:
    """Derive the UIDs, accession number, study ID and time that were not given."""
    study = study_uid or _uid("study", patient_id, ph.seed)
    series_uid = _uid("series", study, ph.seed, ph.label, ph.image.shape[0], *style, series)
    if when is None:
        offset = _hash_int("when", ph.seed)
        when = datetime(2020, 3, 2, 7, 30) + timedelta(days=offset % 700, seconds=(offset >> 16) % 36000)
    return _Ids(
        study_uid=study,
        series_uid=series_uid,
        sop_uid=_uid("instance", series_uid, instance),
        accession=accession or f"PH{_hash_int('accession', study) % 10**10:010d}",
        study_id=f"{_hash_int('study id', study) % 10**8:08d}",
        when=when,
    )


def _patient_study(ds: Dataset, ph: Phantom, ids: _Ids, patient_id: str, patient_name: str) -> None:
    """Fill the Patient and General Study modules (birth date stable per patient ID)."""
    born = datetime(1935, 1, 1) + timedelta(days=_hash_int("born", patient_id) % (365 * 65))
    age = ids.when.year - born.year - ((ids.when.month, ids.when.day) < (born.month, born.day))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = born.strftime("%Y%m%d")
    ds.PatientSex = ph.patient_sex
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyInstanceUID = ids.study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ids.when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = ids.when.strftime("%H%M%S")
    ds.AccessionNumber = ids.accession
    ds.StudyID = ids.study_id
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"


def _series_equipment(ds: Dataset, modality: str, ids: _Ids, series: int, view_position: str, body_part: str) -> None:
    """Fill the General Series, CR/DX Series, General Equipment and acquisition attributes."""
    ds.Modality = modality
    ds.SeriesInstanceUID = ids.series_uid
    ds.SeriesNumber = series
    ds.SeriesDescription = f"{body_part} {view_position}"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.SoftwareVersions = f"cxr_node.training.phantoms {PHANTOM_VERSION}"
    ds.InstitutionName = "Synthetic Data"
    ds.StationName = "PHANTOM"
    ds.KVP = 120
    ds.DistanceSourceToDetector = 1800
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 250
    ds.Exposure = 3


def _image(
    ds: Dataset, ph: Phantom, ids: _Ids, pixels: NDArray[np.uint16], photometric: str, bits: int, number: int
) -> None:
    """Fill the General Image, Image Pixel, Modality LUT, VOI LUT and SOP Common modules."""
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    ds.SOPClassUID = _SOP_CLASSES[ds.Modality]
    ds.SOPInstanceUID = ids.sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = number
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagerPixelSpacing = ds.PixelSpacing = [f"{ph.pixel_spacing_mm:.6g}"] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{max(hi - lo, 2.0):.1f}"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.astype("<u2").tobytes()


def _code(value: str, meaning: str) -> Dataset:
    """Return a SNOMED CT code item."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _dx_specific(ds: Dataset, photometric: str) -> None:
    """Fill the DX Series, DX Anatomy Imaged, DX Image, DX Detector and DX Positioning attributes."""
    inverted = photometric == "MONOCHROME1"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if inverted else -1
    ds.PresentationLUTShape = "INVERSE" if inverted else "IDENTITY"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("43799004", "Chest")])
    ds.ViewCodeSequence = Sequence([_code("399348003", "postero-anterior")])
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "COLUMN"
    ds.AcquisitionContextSequence = Sequence()


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """Return the file meta information for Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta

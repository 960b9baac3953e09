"""What highdicom 0.28 writes around every object it builds, made directly: the File Meta Information and the
contributing-equipment entries it derives from the source image.

The SR (:mod:`cxr_node.results.sr_document`) and the SC overlay (:mod:`cxr_node.results.sc`) are assembled with
pydicom, attribute for attribute as highdicom builds them (highdicom's constructors cost several times more,
most of it looking the source's SOP class up in the standard's IOD tables on every call); highdicom stays the
reference their equivalence tests compare against byte for byte.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Final

import highdicom as hd
from highdicom._standard_utils import does_iod_have_pixel_data  # the standard's IOD tables highdicom decides by
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DT

from cxr_node.results.common import clone_dataset

IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.9.7433.1.1"
"""The Implementation Class UID highdicom writes in the File Meta Information of everything it builds."""
_CONTRIBUTION_DATETIME: Final = BaseTag(0x0018A002)


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """The File Meta Information highdicom writes (Explicit VR Little Endian, its implementation class and version
    name), its group length included."""
    meta = _without_length(sop_class_uid, sop_instance_uid)
    meta.add(DataElement(0x00020000, "UL", _group_length(sop_class_uid, len(sop_instance_uid))))
    return meta


def _without_length(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.add(DataElement(0x00020001, "OB", b"\x00\x01"))
    meta.add(DataElement(0x00020002, "UI", sop_class_uid))
    meta.add(DataElement(0x00020003, "UI", sop_instance_uid))
    meta.add(DataElement(0x00020010, "UI", ExplicitVRLittleEndian))
    meta.add(DataElement(0x00020012, "UI", IMPLEMENTATION_CLASS_UID))
    meta.add(DataElement(0x00020013, "SH", f"highdicom{hd.__version__}"))
    return meta


@lru_cache(maxsize=64)
def _group_length(sop_class_uid: str, uid_length: int) -> int:
    """The value highdicom gives File Meta Information Group Length: the bytes of the whole group as pydicom writes
    it, which only the SOP class and the length of the SOP Instance UID change (any UID of that length gives it)."""
    with DicomBytesIO() as buffer:
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_file_meta_info(buffer, _without_length(sop_class_uid, "1" * uid_length), enforce_standard=True)
        return len(buffer.getvalue())


def acquisition_equipment(source: Dataset) -> hd.ContributingEquipment:
    """The entry highdicom's ``ContributingEquipment.for_image_acquisition`` makes for ``source``, with the same
    arguments and errors; whether the source's SOP class is an image is looked up once per class.

    Raises
    ------
    ValueError, AttributeError, KeyError
        As highdicom: the source is not an image, has no manufacturer, or its SOP class is unknown.
    """
    if not is_image_class(str(source.SOPClassUID)):
        raise ValueError("Dataset does not represent an Image.")
    manufacturer = source.get("Manufacturer")  # NB type 2
    if manufacturer is None or manufacturer == "":
        raise AttributeError("Dataset has no manufacturer information.")
    contribution_datetime = source.get("AcquisitionDateTime")
    if contribution_datetime is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            contribution_datetime = datetime.datetime.combine(date, time)
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=dcm_codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=source.get("ManufacturerModelName"),
        software_versions=source.get("SoftwareVersions"),
        device_serial_number=source.get("DeviceSerialNumber"),
        institution_name=source.get("InstitutionName"),
        institutional_department_name=source.get("InstitutionalDepartmentName"),
        institution_address=source.get("InstitutionAddress"),
        station_name=source.get("StationName"),
        contribution_datetime=contribution_datetime,
        contribution_description="Acquisition equipment of the source image(s)",
    )


@cache
def is_image_class(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` has pixel data, as highdicom decides it (KeyError for an unknown class)."""
    return does_iod_have_pixel_data(sop_class_uid)


def equipment_items(source: Dataset, contributing: Sequence[Dataset], clock: datetime.datetime) -> list[Dataset]:
    """The Contributing Equipment items highdicom writes on an object derived from ``source``: the source's
    acquisition equipment (when highdicom can describe it), then ``contributing`` (the node's entries,
    :func:`~cxr_node.results.common.contributing_equipment`), then highdicom's own entry dated by ``clock``."""
    items: list[Dataset] = []
    with contextlib.suppress(Exception):  # highdicom leaves the acquisition entry out on any failure
        items.append(acquisition_equipment(source))
    highdicom = clone_dataset(_highdicom_equipment())
    highdicom.add(DataElement(_CONTRIBUTION_DATETIME, "DT", DT(clock)))
    return [*items, *contributing, highdicom]


@cache
def _highdicom_equipment() -> hd.ContributingEquipment:
    """highdicom's ``ContributingEquipment.for_highdicom()`` without its Contribution DateTime, made once (about a
    millisecond each time); :func:`equipment_items` dates a copy of it."""
    item = hd.ContributingEquipment.for_highdicom()
    del item[_CONTRIBUTION_DATETIME]
    return item

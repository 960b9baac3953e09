"""The outputs' writer gives, byte for byte, what pydicom's ``dcmwrite`` gives; what it does not cover goes to it."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import DA, DT, TM

from cxr_node.results.common import OutputError, OutputOptions, encode, encode_reference
from cxr_node.results.encoding import write_explicit_le
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from cxr_node.results.outputs import build_dataset
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset

PROVENANCE = Provenance("cxr-demo", "1.0.0", "demo: not for clinical use", ("mobilenet",), "0.1.0", "2.25.42")
CASES = (SimilarCase(1, 0.93, "C0000012", "covid", "1.2.3", "1.2.3.4", "ACC123", "20200301"),)


def _dataset(charset: str | list[str] | None = None) -> Dataset:
    """A small data set with file meta, ready to be written."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    if charset is not None:
        ds.SpecificCharacterSet = charset
    return ds


def _phantom_outputs(name: str, charset: str | None) -> list[Dataset]:
    phantom = make_phantom(5, 1, 256)
    source = phantom_to_dataset(phantom, patient_id="P9", patient_name=name, photometric="MONOCHROME1")
    if charset:
        source.SpecificCharacterSet = charset
    summary = Summary(
        "cxr-demo", "1.0.0", True, (256, 256), probability=0.8, threshold=0.5, members=(("mobilenet", 0.8),),
        lung_mask=MaskVerdict(True, "plausible", 0.3, 2), similar=CASES,
    )  # fmt: skip
    image = phantom.image.astype(np.float32)
    findings = Findings(PROVENANCE, summary, image=image, lung_mask=phantom.lung_mask.astype(bool), heatmap=image * 0)
    return [build_dataset(source, findings, OutputOptions(), kind) for kind in ("sr", "sc", "seg", "pr")]


@pytest.mark.parametrize(
    ("name", "charset"), [("Doe^Jane", None), ("Müller^Jürgen", None), ("Müller^Jürgen", "ISO_IR 100")]
)
def test_every_output_kind_is_written_as_pydicom_writes_it(name: str, charset: str | None) -> None:
    """SR, SC, SEG and GSPS come out identical to ``dcmwrite``'s bytes, without falling back to it."""
    for dataset in _phantom_outputs(name, charset):
        assert write_explicit_le(dataset) is not None, dataset.Modality
        assert encode(dataset) == encode_reference(dataset), dataset.Modality


def _every_vr() -> Dataset:
    ds = _dataset(["ISO 2022 IR 6", "ISO 2022 IR 100"])
    ds.add(DataElement(0x00081160, "IS", [1, 2, 3]))  # IS multi-valued
    ds.add(DataElement(0x00181164, "DS", ["0.1", "0.25"]))  # DS multi-valued
    ds.add(DataElement(0x00200020, "CS", ["A", "P"]))  # CS multi-valued
    ds.add(DataElement(0x00100010, "PN", ["Müller^Jürgen", "Doe^Jane"]))  # PN multi-valued
    ds.add(DataElement(0x00100020, "LO", "odd"))
    ds.add(DataElement(0x00081030, "LO", ["a", "bé"]))
    ds.add(DataElement(0x00204000, "LT", "line one\r\nline two é"))
    ds.add(DataElement(0x00080020, "DA", DA(datetime.date(2020, 3, 1))))
    ds.add(DataElement(0x00080030, "TM", TM(datetime.time(10, 11, 12, 5))))
    ds.add(DataElement(0x00080031, "TM", TM(datetime.time(10, 11, 12))))
    ds.add(DataElement(0x0008002A, "DT", DT(datetime.datetime(2020, 3, 1, 10, 11, 12, 7))))
    ds.add(DataElement(0x00080021, "DA", "20200301"))
    ds.add(DataElement(0x00280010, "US", 256))
    ds.add(DataElement(0x00281050, "DS", "40"))
    ds.add(DataElement(0x00209165, "AT", [0x00100010, 0x00200032]))
    ds.add(DataElement(0x00209167, "AT", 0x00100020))
    ds.add(DataElement(0x00700022, "FL", [1.5, 2.25, 3.0]))
    ds.add(DataElement(0x0040A161, "FD", 0.123456789))
    ds.add(DataElement(0x00186020, "SL", -5))
    ds.add(DataElement(0x00281300, "CS", ""))
    ds.add(DataElement(0x00080090, "PN", None))
    ds.add(DataElement(0x00091010, "OB", b"\x01\x02\x03"))  # odd length: padded
    ds.add(DataElement(0x00091011, "UN", b"\x01\x02"))
    ds.add(DataElement(0x00091012, "UT", "x" * 70000))  # a long value in a 32-bit length VR
    ds.add(DataElement(0x7FE00010, "OW", np.arange(8, dtype=np.uint16).tobytes()))
    inner = Dataset()
    inner.SpecificCharacterSet = "ISO_IR 192"
    inner.PatientName = "Ελληνικά^Όνομα"
    empty_item = Dataset()
    ds.add(DataElement(0x00081115, "SQ", DicomSequence([inner, empty_item])))
    ds.add(DataElement(0x00081140, "SQ", DicomSequence([])))
    undefined = DataElement(0x00081199, "SQ", DicomSequence([Dataset()]), is_undefined_length=True)
    undefined.value[0].ReferencedSOPInstanceUID = "1.2.3"
    undefined.value[0].is_undefined_length_sequence_item = True
    ds.add(undefined)
    return ds


def test_every_vr_and_sequence_form_is_written_as_pydicom_writes_it() -> None:
    """Multi-values, dates and times as objects, person names in two character sets, tags, numbers, binary data,
    an item with its own character set, empty and undefined-length sequences and items: the same bytes."""
    ds = _every_vr()
    assert write_explicit_le(ds) is not None
    assert encode(ds) == encode_reference(ds)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_what_the_writer_does_not_cover_is_written_by_pydicom() -> None:
    """Raw elements read from a file, ambiguous VRs and over-long short values go to ``dcmwrite``; the bytes agree."""
    ds = _every_vr()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = dcmread(io.BytesIO(buffer.getvalue()))
    assert write_explicit_le(raw) is None  # raw elements
    assert encode(raw) == encode_reference(raw)
    ambiguous = _dataset()
    ambiguous.add(DataElement(0x00283006, "US or SS", [1, 2]))
    assert write_explicit_le(ambiguous) is None
    long_short = _dataset()
    long_short.add(DataElement(0x00091013, "OB", b""))
    long_short.add(DataElement(0x00091014, "LO", "x" * 70000))
    assert write_explicit_le(long_short) is None


def test_a_text_the_character_set_cannot_hold_is_refused() -> None:
    """Under the strict writing mode, a text the declared character set cannot encode fails, as it does in pydicom."""
    ds = _dataset("ISO_IR 100")
    ds.PatientName = "Ελληνικά"
    with pytest.raises(OutputError):
        encode(ds)
    with pytest.raises(OutputError):
        encode_reference(ds)

"""Every coded concept the node writes, in one place: standard codes where they exist, a private scheme where not.

Standard schemes: SNOMED CT (``SCT``), DICOM (``DCM``, PS3.16), UCUM units. The private scheme
``99CXRNODE`` (PS3.16 §8.2: private designators start with ``99``) names what no standard code says;
docs/outputs.md lists it.
"""

from __future__ import annotations

from typing import Final

from pydicom.sr.coding import Code

PRIVATE_SCHEME: Final = "99CXRNODE"

# What was done and what was looked for.
PLAIN_CHEST_XRAY: Final = Code("399208008", "SCT", "Plain chest X-ray")
COVID19: Final = Code("840539006", "SCT", "COVID-19")
LUNG: Final = Code("39607008", "SCT", "Lung structure")

# Who made it: IHE AI Results' purpose of reference for an algorithm in the Contributing Equipment Sequence
# (the profile's own code, used until DICOM assigns one; docs/ihe-air.md).
PROCESSING_ALGORITHM: Final = Code("Newcode1", "99IHE", "Processing Algorithm")

# Values of qualitative evaluations.
PRESENT: Final = Code("52101004", "SCT", "Present")
ABSENT: Final = Code("272519000", "SCT", "Absent")

# Numbers and their units.
PROBABILITY: Final = Code("122157", "DCM", "Probability")
OPERATING_POINT: Final = Code("111071", "DCM", "CAD Operating Point")
UNIT_PROBABILITY: Final = Code("{probability}", "UCUM", "probability")
UNIT_RATIO: Final = Code("1", "UCUM", "no units")

# The CAD processing summary (CID 6047): did the algorithms run, did they find something.
PROCESSING_SUMMARY: Final = Code("111017", "DCM", "CAD Processing and Findings Summary")
SUCCEEDED_WITH_FINDINGS: Final = Code("111242", "DCM", "All algorithms succeeded; with findings")
SUCCEEDED_WITHOUT_FINDINGS: Final = Code("111241", "DCM", "All algorithms succeeded; without findings")
NONE_SUCCEEDED: Final = Code("111245", "DCM", "No algorithms succeeded; without findings")

# Free text and references.
IMPRESSION: Final = Code("121073", "DCM", "Impression")
STUDY_INSTANCE_UID: Final = Code("110180", "DCM", "Study Instance UID")
ACCESSION_NUMBER: Final = Code("121022", "DCM", "Accession Number")
STUDY_DATE: Final = Code("111060", "DCM", "Study Date")
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Final = Code("121106", "DCM", "Comment")

# Private concepts: no standard code says these.
LUNG_MASK_QUALITY: Final = Code("CXRN001", PRIVATE_SCHEME, "Lung segmentation quality")
PLAUSIBLE: Final = Code("CXRN002", PRIVATE_SCHEME, "Plausible")
IMPLAUSIBLE: Final = Code("CXRN003", PRIVATE_SCHEME, "Implausible")
SIMILARITY: Final = Code("CXRN004", PRIVATE_SCHEME, "Embedding similarity")
INTENDED_USE: Final = Code("CXRN005", PRIVATE_SCHEME, "Intended use")
REASON_NOT_ANALYSED: Final = Code("CXRN006", PRIVATE_SCHEME, "Reason not analysed")
SIMILAR_CASE_SOP_INSTANCE_UID: Final = Code("CXRN007", PRIVATE_SCHEME, "Similar case SOP Instance UID")
CASE_NUMBER: Final = Code("CXRN008", PRIVATE_SCHEME, "De-identified case number")
SIMILAR_CASES: Final = Code("CXRN010", PRIVATE_SCHEME, "Similar past cases")
OUTSIDE_DOMAIN: Final = Code("CXRN009", PRIVATE_SCHEME, "Outside validated domain")
DEPLOYMENT_MODE: Final = Code("CXRN011", PRIVATE_SCHEME, "AI deployment mode")

PRIVATE_CODES: Final = (
    LUNG_MASK_QUALITY,
    PLAUSIBLE,
    IMPLAUSIBLE,
    SIMILARITY,
    INTENDED_USE,
    REASON_NOT_ANALYSED,
    SIMILAR_CASE_SOP_INSTANCE_UID,
    CASE_NUMBER,
    SIMILAR_CASES,
    OUTSIDE_DOMAIN,
    DEPLOYMENT_MODE,
)
"""The private concepts, for docs/outputs.md and the conformance statement."""

MODALITY_OF_CLASS: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
}
"""The Modality each radiograph class implies: what a radiograph sent without its (Type 1) Modality is taken as."""

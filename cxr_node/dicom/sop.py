"""The SOP classes and transfer syntaxes the node accepts and emits.

The receiver accepts every storage SOP class pynetdicom knows, so that a PACS routing rule never fails
negotiation; only the radiograph classes in :data:`RADIOGRAPH_CLASSES` are analysed, the rest are
recorded as skipped. Radiographs are accepted in the transfer syntaxes the node can decode
(:data:`DECODABLE_TRANSFER_SYNTAXES`); other classes in any syntax, since their pixels are never read.
"""

from __future__ import annotations

from typing import Final

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import _STORAGE_CLASSES

RADIOGRAPH_CLASSES: Final[tuple[UID, ...]] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
"""SOP classes whose instances are candidates for analysis (CR, DX for presentation/processing)."""

DECODABLE_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""Transfer syntaxes pydicom decodes with the node's plugins (pylibjpeg, openjpeg, libjpeg, rle)."""

ANY_TRANSFER_SYNTAX: Final[tuple[UID, ...]] = tuple(UID(ts) for ts in ALL_TRANSFER_SYNTAXES)
"""Every transfer syntax pynetdicom knows; accepted for classes whose pixels are never decoded."""

STORAGE_CLASSES: Final[tuple[UID, ...]] = tuple(UID(uid) for uid in _STORAGE_CLASSES.values())
"""Every storage SOP class pynetdicom knows (170 in pynetdicom 3.0)."""

VERIFICATION_CLASS: Final = UID("1.2.840.10008.1.1")
"""The Verification SOP Class (C-ECHO)."""


def scp_contexts() -> list[tuple[UID, tuple[UID, ...]]]:
    """Return ``(abstract syntax, transfer syntaxes)`` for every context the SCP supports.

    Returns
    -------
    list of (UID, tuple of UID)
        Verification first, then every storage class; radiographs with decodable syntaxes only.
    """
    contexts: list[tuple[UID, tuple[UID, ...]]] = [
        (VERIFICATION_CLASS, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    ]
    for uid in STORAGE_CLASSES:
        syntaxes = DECODABLE_TRANSFER_SYNTAXES if uid in RADIOGRAPH_CLASSES else ANY_TRANSFER_SYNTAX
        contexts.append((uid, syntaxes))
    return contexts

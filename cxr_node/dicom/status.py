"""Every DIMSE status code the node sends or reads, each with its PS3.4 / PS3.7 reference.

No other module writes a status as a number.
"""

from __future__ import annotations

from typing import Final

# General (PS3.7 Annex C)
SUCCESS: Final = 0x0000
"""Success (PS3.7 C.1.1)."""

# C-STORE failures (PS3.4 B.2.3, Table B.2-1)
OUT_OF_RESOURCES: Final = 0xA700
"""Refused: Out of Resources (PS3.4 B.2.3). The peer is expected to retry later."""
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
"""Error: Data Set does not match SOP Class (PS3.4 B.2.3)."""
CANNOT_UNDERSTAND: Final = 0xC000
"""Error: Cannot understand (PS3.4 B.2.3, range C000-CFFF)."""
IDENTIFIER_INVALID: Final = 0xC001
"""Error: Cannot understand (PS3.4 B.2.3, range C000-CFFF, implementation specific): an identifying UID
(SOP Instance, SOP Class, Study or Series Instance UID) is missing or is not a valid UID (PS3.5 9.1)."""
INSTANCE_CONFLICT: Final = 0xC002
"""Error: Cannot understand (PS3.4 B.2.3, range C000-CFFF, implementation specific): the SOP Instance UID was
already received with another patient, study, series, SOP class or pixel data."""
UNEXPECTED_FAILURE: Final = 0xC211
"""Error: Cannot understand, used (as pynetdicom does) for an unexpected error in our handler."""
INSTANCE_TOO_LARGE: Final = 0xCB01
"""Error: Cannot understand (PS3.4 B.2.3, range C000-CFFF), the node's code for a data set larger than
``node.max_instance_mb`` as received or once inflated: a failure, not 0xA7xx, since a retry cannot succeed."""
HEADER_TOO_COMPLEX: Final = 0xCB02
"""Error: Cannot understand (PS3.4 B.2.3, range C000-CFFF), the node's code for a header over the structure
bounds (sequence items, nesting depth, elements or bytes held while parsing)."""

# C-STORE warnings (PS3.4 B.2.3)
COERCION_OF_DATA_ELEMENTS: Final = 0xB000
"""Warning: Coercion of Data Elements (PS3.4 B.2.3)."""
ELEMENTS_DISCARDED: Final = 0xB006
"""Warning: Elements Discarded (PS3.4 B.2.3)."""
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007
"""Warning: Data Set does not match SOP Class (PS3.4 B.2.3)."""

ERROR_COMMENT_MAX: Final = 64
"""ErrorComment (0000,0902) is LO: at most 64 characters (PS3.7 E.1)."""


def is_success(status: int) -> bool:
    """Return True for Success (0x0000)."""
    return status == SUCCESS


def is_warning(status: int) -> bool:
    """Return True for a C-STORE warning status (0x0001, 0x0107, 0x0116, Bxxx; PS3.7 C.3)."""
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def is_failure(status: int) -> bool:
    """Return True for any status that is neither success, warning nor pending."""
    return not (is_success(status) or is_warning(status) or status in (0xFF00, 0xFF01))


def error_comment(reason: str) -> str:
    """Return ``reason`` as a valid ErrorComment: printable ASCII, at most 64 characters."""
    text = "".join(ch if 32 <= ord(ch) < 127 and ch != "\\" else "?" for ch in reason)
    return text[:ERROR_COMMENT_MAX]

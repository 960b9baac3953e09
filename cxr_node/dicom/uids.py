"""How the node identifies itself and its outputs: its Manufacturer, deterministic UIDs, its private block.

The same source, model version and output kind always give the same UIDs, so a retry after a crash re-creates
the same identifiers and a PACS that already stored the object keeps one copy (DESIGN.md §6). UIDs are of the
``2.25.<integer>`` form (PS3.5 §B.2): the integer is the first 128 bits of a SHA-256 over the inputs, so no
organisation root is needed.

Every output also carries a private block (creator :data:`PRIVATE_CREATOR`) naming the source SOP Instance
UID, the model and the output kind it was derived from: an object routed back to the node is recognised as
its own only when that block is there *and* its SOP Instance UID is the one those three derive
(:func:`is_own_output`), never by its Manufacturer alone. Standard library only: the neighbour index uses
:func:`uid_problem` too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Literal

UID_ROOT: Final = "2.25."
NODE_MANUFACTURER: Final = "cxr-node"
"""The Manufacturer every output of the node carries."""
Part = Literal["series", "instance", "tracking", "device"]

UID_MAX_LENGTH: Final = 64
_UID_COMPONENT: Final = re.compile(r"0|[1-9][0-9]*")

PRIVATE_GROUP: Final = 0x0009
"""The odd group of the node's private block in its outputs (PS3.5 §7.8.1)."""
PRIVATE_CREATOR: Final = "CXR_NODE 1.0"
"""The Private Creator value that reserves the block; its elements are at these offsets within it."""
PRIVATE_SOURCE_UID: Final = 0x01
"""UI: the SOP Instance UID of the analysed image the output was made from."""
PRIVATE_MODEL: Final = 0x02
"""UT: the model the output was made by, as :attr:`Provenance.model_key` (``name/version``)."""
PRIVATE_KIND: Final = 0x03
"""CS: the output kind (``SR``, ``SC``, ``SEG``, ``PR``), upper case."""


def derived_uid(*parts: str) -> str:
    """Return a ``2.25.`` UID derived from ``parts`` (each a non-empty string without NUL).

    Raises
    ------
    ValueError
        When no part is given, or a part is empty or holds a NUL character.
    """
    if not parts or any(not part or "\0" in part for part in parts):
        raise ValueError(f"parts must be non-empty strings without NUL, found {parts!r}")
    digest = hashlib.sha256("\0".join(("cxr-node", *parts)).encode("utf-8")).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def output_uid(source_sop_instance_uid: str, model: str, kind: str, part: Part) -> str:
    """Return the UID of ``part`` of the ``kind`` output (sr, sc, seg, pr) made from one source image by
    ``model`` (its name and version, e.g. ``cxr-node-demo/1``)."""
    return derived_uid(source_sop_instance_uid, model, kind, part)


def device_uid(ae_title: str) -> str:
    """Return the UID that identifies this node as a device (SR observer, contributing equipment)."""
    return derived_uid("device", ae_title)


def algorithm_uid(name: str, version: str, *weights_sha256: str) -> str:
    """Return the Device UID of a trained algorithm (IHE AI Results): derived from its name, version and the
    SHA-256 of every weights file it runs, so retraining it changes the UID even when the version is kept."""
    return derived_uid("algorithm", name, version, *weights_sha256)


def uid_problem(value: object) -> str:
    """Return why ``value`` is not a valid UID (PS3.5 §9.1), or "" when it is one.

    A UID is at most 64 characters: numeric components separated by dots, none empty and none with a
    leading zero (except the component ``0`` itself). The reason never repeats the value.
    """
    if not isinstance(value, str) or not value:
        return "empty"
    if len(value) > UID_MAX_LENGTH:
        return f"over {UID_MAX_LENGTH} characters"
    if not all(_UID_COMPONENT.fullmatch(part) for part in value.split(".")):
        return "not digits and dots without leading zeros"
    return ""


def is_own_output(sop_instance_uid: str, source_sop_instance_uid: str, model: str, kind: str) -> bool:
    """Whether an object with ``sop_instance_uid`` is the ``kind`` output the node derives from that source
    image and model: the test its private block must pass before an object routed back is skipped."""
    if not (source_sop_instance_uid and model and kind) or "\0" in source_sop_instance_uid + model + kind:
        return False
    return output_uid(source_sop_instance_uid, model, kind.lower(), "instance") == sop_instance_uid

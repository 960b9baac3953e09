"""How the node identifies itself and its outputs: its Manufacturer, and deterministic UIDs.

The same source, model version and output kind always give the same UIDs, so a retry after a crash re-creates
the same identifiers and a PACS that already stored the object keeps one copy (DESIGN.md §6). UIDs are of the
``2.25.<integer>`` form (PS3.5 §B.2): the integer is the first 128 bits of a SHA-256 over the inputs, so no
organisation root is needed.
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

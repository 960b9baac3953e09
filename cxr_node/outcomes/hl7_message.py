"""HL7 v2 ORU^R01 in, as pure functions: a message's bytes to the outcomes it holds, and the ACK to answer.

:func:`parse_oru` reads a message with python-hl7 (refusing, as :class:`Refusal` with ``AR``, what is not an
HL7 v2 ORU^R01 or has no MSH-10); :func:`plan` turns it into :class:`~cxr_node.jobs.records.NewOutcome` records
through the mapping, with every OBX left out counted by reason; :func:`ack` writes the acknowledgement
(MSH, MSA and, for AE and AR, ERR). What each field is read from is in docs/outcomes.md.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import hl7
import hl7.containers
import hl7.util

from cxr_node.jobs.records import NewOutcome
from cxr_node.outcomes.mapping import Coding, Finding, Mapping, Match

for _module in (hl7.util, hl7.containers):  # python-hl7 logs a bad escape at ERROR with the whole field (report
    logging.getLogger(_module.__file__ or _module.__name__).setLevel(logging.CRITICAL)  # text, a name)

ACCEPTED: Final = "AA"
"""MSA-1: the message was processed (its findings are committed)."""
ERROR: Final = "AE"
"""MSA-1: an ORU^R01 the node could not use (no accession number, no finding the mapping knows)."""
REJECTED: Final = "AR"
"""MSA-1: not an HL7 v2 ORU^R01 (or too large, or without MSH-10)."""

# HL7 table 0357, message error condition codes (ERR-3).
REQUIRED_FIELD_MISSING: Final = "101"
DATA_TYPE_ERROR: Final = "102"
UNSUPPORTED_MESSAGE_TYPE: Final = "200"
UNSUPPORTED_PROCESSING_ID: Final = "202"
PRODUCTION: Final = "P"
"""MSH-11 of the messages recorded (HL7 table 0103); T (training) and D (debugging) are refused."""
APPLICATION_ERROR: Final = "207"

FINAL_STATUSES: Final = frozenset({"F", "C", "A", ""})
"""OBR-25 result statuses recorded: final, corrected, amended (and none given); others (preliminary) are not."""
RETRACTED: Final = frozenset({"W", "D"})
"""OBX-11 statuses of a value that must not be used (wrong, deleted)."""
CODED: Final = frozenset({"CE", "CWE", "CNE", "CF"})
TEXT: Final = frozenset({"ST", "TX", "FT"})
UID: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DICOM_STUDY: Final = "113014"  # DCM "DICOM Study": an OBX carrying the Study Instance UID
MAX_CONTROL_ID: Final = 199
MAX_ACK_TEXT: Final = 80
MAX_ACCESSION: Final = 64


@dataclass(frozen=True)
class Header:
    """What an ACK copies from the message's MSH (application and facility names, processing ID, version)."""

    control_id: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    version: str = "2.5"


class Refusal(Exception):
    """A message answered ``code`` (AE or AR) with ``reason`` and an HL7 table 0357 ``error`` code."""

    def __init__(self, code: str, reason: str, error: str, header: Header | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error
        self.header = header


@dataclass(frozen=True)
class Observation:
    """One OBX: its set ID (or position), its result status (OBX-11) and the finding it carries."""

    set_id: str
    status: str
    finding: Finding | None
    why_not: str = ""


@dataclass(frozen=True)
class Order:
    """One OBR group: its accession number, study, result status, report time and observations."""

    accession_number: str
    study_instance_uid: str
    status: str
    reported_at: float | None
    observations: tuple[Observation, ...]


@dataclass(frozen=True)
class Oru:
    """An ORU^R01 as the node reads it."""

    header: Header
    orders: tuple[Order, ...]


@dataclass(frozen=True)
class Plan:
    """What to record from a message, and what was left out by reason (one count per OBX or OBR)."""

    outcomes: tuple[NewOutcome, ...]
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def only_not_final(self) -> bool:
        """True when nothing is recorded because every order is preliminary (answered AA: the final follows)."""
        return not self.outcomes and bool(self.left_out) and all(r.startswith("not final") for r in self.left_out)


# ------------------------------------------------------------------------------------------ reading


def parse_oru(raw: bytes, accession_fields: Sequence[str]) -> Oru:
    """Read one HL7 v2 message (the bytes inside the MLLP frame).

    Raises
    ------
    Refusal
        ``AR`` when it is not HL7 v2, not an ORU^R01, or has no message control ID (MSH-10).
    """
    message = _parse(raw)
    header = _header(message)
    if sum(str(segment[0]) == "MSH" for segment in message) > 1:  # two messages in one frame: one ACK cannot answer
        raise Refusal(REJECTED, "more than one MSH in one frame: send one message per frame", DATA_TYPE_ERROR, header)
    kind = [_component(message, _field(message.segment("MSH"), 9), i) for i in (0, 1)]
    if kind != ["ORU", "R01"]:
        found = "^".join(part for part in kind if part) or "nothing"
        raise Refusal(REJECTED, f"only ORU^R01 is accepted, found {found}", UNSUPPORTED_MESSAGE_TYPE, header)
    if not header.control_id:
        raise Refusal(REJECTED, "MSH-10 (message control ID) is empty", REQUIRED_FIELD_MISSING, header)
    if header.processing_id.upper() != PRODUCTION:  # training and debugging messages are no one's final findings
        raise Refusal(REJECTED, f"MSH-11 processing ID {header.processing_id[:3]} is not P (production)",
                      UNSUPPORTED_PROCESSING_ID, header)  # fmt: skip
    if len(header.control_id) > MAX_CONTROL_ID:
        raise Refusal(REJECTED, "MSH-10 (message control ID) is too long", DATA_TYPE_ERROR, header)
    return Oru(header, _orders(message, accession_fields, header))


def header_of(raw: bytes) -> Header | None:
    """The MSH of the first bytes of a message (for the answer to one too large to read), or None."""
    ends = [i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0]
    if not ends:
        return None  # the MSH is cut: its control ID could be wrong
    first = raw[: min(ends)]
    try:
        return _header(_parse(first))
    except (Refusal, LookupError, ValueError):
        return None


def _parse(raw: bytes) -> hl7.Message:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the 8-bit character sets senders use (MSH-18 8859/1)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r \t\x00")
    if not text.startswith("MSH") or len(text) < 8:
        raise Refusal(REJECTED, "not an HL7 v2 message (it must start with MSH)", UNSUPPORTED_MESSAGE_TYPE)
    try:
        message = hl7.parse(text)
        message.segment("MSH")
    except Exception as exc:  # python-hl7 raises several types on malformed input
        raise Refusal(REJECTED, f"not a readable HL7 v2 message ({type(exc).__name__})", DATA_TYPE_ERROR) from exc
    return message


def _header(message: hl7.Message) -> Header:
    msh = message.segment("MSH")

    def value(index: int, default: str = "") -> str:
        return _clean(_component(message, _field(msh, index), 0)) or default

    return Header(
        control_id=_component(message, _field(msh, 10), 0).strip(),
        sending_application=value(3),
        sending_facility=value(4),
        receiving_application=value(5),
        receiving_facility=value(6),
        processing_id=value(11, "P"),
        version=value(12, "2.5"),
    )


def _orders(message: hl7.Message, accession_fields: Sequence[str], header: Header) -> tuple[Order, ...]:
    """The OBR groups, each with the ORC before it and the OBX after it; the study from ZDS-1 or an OBX."""
    groups: list[dict[str, list[hl7.Segment]]] = []
    orc: list[hl7.Segment] = []
    study = ""
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            orc = [segment]
        elif name == "OBR":
            groups.append({"ORC": orc, "OBR": [segment], "OBX": []})
            orc = []
        elif name == "OBX" and groups:
            groups[-1]["OBX"].append(segment)
        elif name == "ZDS":
            study = study or _uid(_component(message, _field(segment, 1), 0))
    sent_at = _time(_component(message, _field(message.segment("MSH"), 7), 0))
    return tuple(_order(message, group, accession_fields, study, sent_at) for group in groups)


def _order(message: hl7.Message, group: dict[str, list[hl7.Segment]], accession_fields: Sequence[str], study: str,
           sent_at: float | None) -> Order:  # fmt: skip
    obr = group["OBR"][0]
    accession = ""
    for name in accession_fields:
        segment, index = name.split("-")
        found = group[segment][0] if group[segment] else None
        accession = _component(message, _field(found, int(index)), 0).strip() if found is not None else ""
        if accession:
            break
    observations: list[Observation] = []
    for position, obx in enumerate(group["OBX"], start=1):
        uid = _study_in(message, obx)
        if uid:
            study = study or uid
            continue
        observations.append(_observation(message, obx, position))
    if len({observation.set_id for observation in observations}) < len(observations):  # OBX-1 repeated: each OBX
        observations = [replace(o, set_id=f"#{n}") for n, o in enumerate(observations, start=1)]  # by its place
    reported = _time(_component(message, _field(obr, 22), 0)) or _time(_component(message, _field(obr, 7), 0))
    status = _component(message, _field(obr, 25), 0).strip().upper()
    return Order(accession, study, status, reported or sent_at, tuple(observations))


def _study_in(message: hl7.Message, obx: hl7.Segment) -> str:
    """The Study Instance UID an OBX carries (value type UI, or OBX-3 113014 DICOM Study), else ''."""
    kind = _field(obx, 2).strip().upper()
    if kind == "UI" or _component(message, _field(obx, 3), 0).strip() == DICOM_STUDY:
        return _uid(_component(message, _field(obx, 5), 0))
    return ""


def _observation(message: hl7.Message, obx: hl7.Segment, position: int) -> Observation:
    set_id = _field(obx, 1).strip() or str(position)
    status = _component(message, _field(obx, 11), 0).strip().upper()
    kind = _component(message, _field(obx, 2), 0).strip().upper()
    repetitions = [rep for rep in _repetitions(message, _field(obx, 5)) if any(rep)]
    if not repetitions:
        return Observation(set_id, status, None, "empty OBX-5")
    if kind in CODED:
        return Observation(set_id, status, _coded(repetitions))
    if kind in TEXT or not kind:
        return Observation(set_id, status, Finding(text=" ".join(" ".join(rep) for rep in repetitions)))
    return Observation(set_id, status, None, f"OBX-2 value type {kind[:8]} is neither coded nor text")


def _coded(repetitions: list[list[str]]) -> Finding:
    """CE/CWE: identifier^text^system^alternate identifier^alternate text^alternate system^...^original text."""
    codings: list[Coding] = []
    words: list[str] = []
    for rep in repetitions:
        parts = rep + [""] * (9 - len(rep))
        for code, system in ((parts[0], parts[2]), (parts[3], parts[5])):
            if code.strip() and system.strip():
                codings.append(Coding(system.strip(), code.strip()))
        words.append(parts[1] or parts[4] or parts[8] or ("" if parts[2] or parts[5] else parts[0]))
    return Finding(tuple(codings), " ".join(word for word in words if word))


def _field(segment: hl7.Segment | None, index: int) -> str:
    """The raw text of field ``index`` (MSH counted as HL7 counts it), '' when absent."""
    if segment is None or index >= len(segment):
        return ""
    return str(segment[index])


def _repetitions(message: hl7.Message, raw: str) -> list[list[str]]:
    """A field's repetitions, each a list of its components (subcomponents kept, escapes resolved)."""
    separators = message.separators  # segment, field, repetition, component, subcomponent
    return [[str(message.unescape(part)) for part in rep.split(separators[3])] for rep in raw.split(separators[2])]


def _component(message: hl7.Message, raw: str, index: int) -> str:
    """Component ``index`` of the first repetition of a field's raw text, escapes resolved ('' when absent)."""
    parts = _repetitions(message, raw)[0]
    return parts[index] if index < len(parts) else ""


def _uid(value: str) -> str:
    value = value.strip().removeprefix("urn:oid:")
    return value if len(value) <= 64 and UID.match(value) else ""


def _time(value: str) -> float | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as epoch seconds; local time without an offset."""
    found = re.match(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$", value.strip())
    if found is None:
        return None
    year, month, day, hour, minute, second, zone = found.groups()
    parts = (int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    try:
        datetime.datetime(*parts)  # a day or an hour that does not exist (20260230, 2561) is no date at all
        if zone is None:
            return time.mktime((*parts, 0, 0, -1))
        offset = (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60) * (1 if zone[0] == "+" else -1)
        return calendar.timegm((*parts, 0, 0, 0)) - offset
    except (OverflowError, ValueError):
        return None


def _clean(value: str) -> str:
    """A value copied into the ACK: printable, without HL7 delimiters, bounded."""
    return re.sub(r"[^\x20-\x7e]|[|^~\\&]", "", value)[:64]


# ------------------------------------------------------------------------------------------ mapping


def plan(oru: Oru, mapping: Mapping) -> Plan:
    """The outcomes of ``oru``: one per OBX the mapping maps, in a final order with an accession number.

    ``source_id`` is MSH-10 "/" OBX-1 (with the OBR's position first, "2.1", when the message has several).
    """
    outcomes: list[NewOutcome] = []
    left_out = Counter[str]()
    several = len(oru.orders) > 1
    for number, order in enumerate(oru.orders, start=1):
        if order.status not in FINAL_STATUSES:
            left_out[f"not final (OBR-25 {order.status[:2]})"] += 1
            continue
        if not order.accession_number or len(order.accession_number) > MAX_ACCESSION:
            left_out["no accession number" if not order.accession_number else "accession number too long"] += 1
            continue
        for observation in order.observations:
            found = _classify(observation, mapping)
            if not isinstance(found, Match):
                left_out[found] += 1
                continue
            set_id = f"{number}.{observation.set_id}" if several else observation.set_id
            outcomes.append(NewOutcome(
                source="hl7", source_id=f"{oru.header.control_id}/{set_id}",
                accession_number=order.accession_number, label=found.label,
                study_instance_uid=order.study_instance_uid, code=found.code, reported_at=order.reported_at,
            ))  # fmt: skip
    if not oru.orders:
        left_out["no OBR segment"] += 1
    return Plan(tuple(outcomes), dict(left_out))


def _classify(observation: Observation, mapping: Mapping) -> Match | str:
    if observation.status in RETRACTED:
        return f"OBX-11 status {observation.status}"
    if observation.finding is None:
        return observation.why_not
    found = mapping.classify(observation.finding)
    return found if isinstance(found, Match) else found.reason


# ------------------------------------------------------------------------------------------- answer


def ack(header: Header | None, code: str, text: str = "", error: str = "") -> bytes:
    """The acknowledgement (original mode) of a message with ``header`` (None: one that could not be read).

    MSH swaps the sender and receiver of the message and copies its processing ID and version; MSA-1 is
    ``code``, MSA-2 the message's control ID, MSA-3 ``text``; for AE and AR an ERR segment carries the HL7 table
    0357 ``error`` code and ``text``.
    """
    head = header or Header()
    now = time.strftime("%Y%m%d%H%M%S")
    msh = "|".join(["MSH", "^~\\&", head.receiving_application or "CXR_NODE", head.receiving_facility,
                    head.sending_application, head.sending_facility, now, "", "ACK^R01^ACK",
                    f"CXR{uuid.uuid4().hex[:17]}", head.processing_id, head.version])  # fmt: skip
    said = escape(" ".join(text.split())[:MAX_ACK_TEXT])  # cut before escaping: never half an escape sequence
    segments = [msh, f"MSA|{code}|{escape(head.control_id)}|{said}"]
    if code != ACCEPTED:
        segments.append(f"ERR|||{error or APPLICATION_ERROR}^^HL70357|E||||{said}")
    return ("\r".join(segments) + "\r").encode("utf-8")


def escape(text: str) -> str:
    """``text`` with the HL7 delimiters escaped and line breaks as spaces."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
    return " ".join(out.replace("~", "\\R\\").split())

"""Worklist triage out as HL7 v2.5 ORU^R01 over MLLP: the message (built and validated by hl7apy), the ACK's
meaning (read with python-hl7), and the transport (a TCP or TLS connection per delivery round).

The message is built from :class:`~cxr_node.send.triage.TriageFacts` alone, so a job's message is the same bytes
every time it is sent: its control ID (MSH-10) derives from the job and its date/time (MSH-7) is the result's, so
a RIS that sees a control ID twice knows it is a resend (docs/triage-out.md has every field). Text from the source
is escaped (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``), never parsed as delimiters; a value HL7 cannot carry is left out.

The ACK (original mode, MSA-1) decides: AA or CA, delivered; AE or CE, a failure (retried with backoff, dead after
``delivery.max_attempts``); AR or CR, a permanent refusal (dead at once: the RIS rejected the message itself, e.g.
its type, version or processing ID, and the same bytes will be rejected again). An ACK naming another control ID,
or an answer that is not an ACK, is a failure and the connection is opened again for the next message. No
connection, a connection lost before the ACK, or no ACK in time: the RIS is down, the destination backs off as a
whole and no attempt is counted (the same message, same control ID, is sent again later).
"""

from __future__ import annotations

import datetime
import re
import socket
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import hl7
import structlog
from hl7apy import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import HL7apyException

from cxr_node.config import Destination
from cxr_node.dicom import status
from cxr_node.errors import SendError
from cxr_node.results.findings import DECISIONS, MODE_NOTICES
from cxr_node.send.scu import ClientTLS, StoreResult
from cxr_node.send.triage import TriageFacts

log = structlog.get_logger("cxr_node.send")

VERSION: Final = "2.5"
START: Final = b"\x0b"
END: Final = b"\x1c\x0d"
"""MLLP framing (HL7 v2 Transport Specification: MLLP release 2 block format): <VT> message <FS><CR>."""
MAX_ACK_BYTES: Final = 64 * 1024
"""The most of an answer read: an ACK is a few hundred bytes."""
CODING_SYSTEM: Final = "99CXRN"
"""The local coding system of the node's codes (HL7 table 0396: local systems start with 99)."""
SENDING_APPLICATION: Final = "CXR_NODE"
UNIVERSAL_SERVICE: Final = ("CXRN-TRIAGE", "Chest radiograph AI triage")
FINDING_CODES: Final = {DECISIONS[0]: "POS", DECISIONS[1]: "NEG", DECISIONS[2]: "NA"}
"""The local code of each decision (OBX-5 of the finding), by the decision's words."""
OBSERVATIONS: Final = {
    "probability": ("CXRN-PROB", "AI probability of COVID-19 pneumonia"),
    "finding": ("CXRN-FINDING", "AI finding"),
    "model": ("CXRN-MODEL", "AI model name and version"),
    "operating_point": ("CXRN-OP", "AI operating point (threshold)"),
    "operating_point_source": ("CXRN-OPSRC", "AI operating point source"),
    "mode": ("CXRN-MODE", "AI go-live mode"),
    "reason": ("CXRN-REASON", "Why the image was not analysed"),
}
"""OBX-3 of each observation the message carries: local code and text."""
ACCEPTED: Final = frozenset({"AA", "CA"})
FAILED: Final = frozenset({"AE", "CE"})
REJECTED: Final = frozenset({"AR", "CR"})
_ESCAPES: Final = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_UNSAFE: Final = re.compile(r"[\x00-\x1f\x7f]")


def escape(value: str, limit: int = 200) -> str:
    """``value`` as HL7 text: control characters dropped, cut to ``limit`` characters, then the delimiters and
    the escape character written as escape sequences (never read as structure)."""
    text = _UNSAFE.sub(" ", value).strip()[:limit]
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return text


def hl7_time(epoch: float) -> str:
    """An HL7 TS (``YYYYMMDDHHMMSS+ZZZZ``) of ``epoch`` in UTC."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y%m%d%H%M%S+0000")


@dataclass(frozen=True)
class Addressing:
    """Who sends (MSH-3) and who receives (MSH-5, MSH-6)."""

    sending_application: str = SENDING_APPLICATION
    receiving_application: str = ""
    receiving_facility: str = ""


def build_oru(facts: TriageFacts, addressing: Addressing = Addressing()) -> Message:
    """The ORU^R01 of ``facts``, validated.

    Raises
    ------
    ValueError
        When hl7apy finds the message invalid (a bug: every value is checked before it is set).
    """
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _msh(message.msh, facts, addressing)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), facts)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _orc(order.add_segment("ORC"), facts)
    _obr(order.add_segment("OBR"), facts)
    _notes(order, facts)
    _timing(order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1"), facts)
    for number, (value_type, name, value, unit) in enumerate(observations(facts), 1):
        _obx(order.add_group("ORU_R01_OBSERVATION").add_segment("OBX"), number, value_type, name, value, unit, facts)
    try:
        message.validate()
    except HL7apyException as exc:
        raise ValueError(f"the ORU^R01 of job {facts.job_id} is invalid: {exc}") from exc
    return message


def encode(facts: TriageFacts, addressing: Addressing = Addressing()) -> bytes:
    """The ORU^R01 of ``facts`` as UTF-8 ER7 (segments ended by CR), ready to frame."""
    er7: str = build_oru(facts, addressing).to_er7()
    return er7.encode("utf-8") + b"\r"


def _msh(msh: Segment, facts: TriageFacts, addressing: Addressing) -> None:
    msh.msh_3 = escape(addressing.sending_application, 180)
    if addressing.receiving_application:
        msh.msh_5 = escape(addressing.receiving_application, 180)
    if addressing.receiving_facility:
        msh.msh_6 = escape(addressing.receiving_facility, 180)
    msh.msh_7 = hl7_time(facts.result_time)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = facts.control_id
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_18 = "UNICODE UTF-8"


def _pid(pid: Segment, facts: TriageFacts) -> None:
    source = facts.source
    pid.pid_1 = "1"
    pid.pid_3 = escape(source.patient_id, 20) if source.patient_id else '""'  # "": explicitly unknown
    if source.patient_id and source.issuer:
        pid.pid_3.cx_4 = escape(source.issuer, 20)
    pid.pid_5 = person_name(source.patient_name) or '""'
    if source.birth_date:
        pid.pid_7 = source.birth_date
    if source.sex in ("M", "F", "O"):
        pid.pid_8 = source.sex


def person_name(pn: str) -> str:
    """The XPN (family^given^middle^suffix^prefix) of a DICOM PN (family^given^middle^prefix^suffix, its
    alphabetic group), each part escaped; "" when it names nobody."""
    parts = [escape(part, 50) for part in pn.split("=")[0].split("^")[:5]]
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = parts
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^") if any(parts) else ""


def _orc(orc: Segment, facts: TriageFacts) -> None:
    orc.orc_1 = "RE"  # observations to follow
    if facts.source.accession_number:
        orc.orc_3 = escape(facts.source.accession_number, 16)
    orc.orc_7.tq_6 = facts.priority


def _obr(obr: Segment, facts: TriageFacts) -> None:
    source = facts.source
    obr.obr_1 = "1"
    if source.accession_number:
        obr.obr_3 = escape(source.accession_number, 16)
    obr.obr_4 = f"{UNIVERSAL_SERVICE[0]}^{escape(UNIVERSAL_SERVICE[1])}^{CODING_SYSTEM}"
    if source.study_date:
        obr.obr_7 = source.study_date + source.study_time.split(".")[0][:6]
    obr.obr_22 = hl7_time(facts.result_time)
    obr.obr_25 = "P"  # preliminary: no person has signed it
    obr.obr_27.tq_6 = facts.priority


def _notes(order: Group, facts: TriageFacts) -> None:
    lines = ["AI triage result, preliminary: not reviewed by a radiologist."]
    if MODE_NOTICES[facts.mode]:
        lines.append(MODE_NOTICES[facts.mode])
    if facts.summary.domain_text:
        lines.append(f"Image {facts.summary.domain_text}.")
    for number, line in enumerate(lines, 1):
        nte = order.add_segment("NTE")
        nte.nte_1 = str(number)
        nte.nte_3 = escape(line)


def _timing(tq1: Segment, facts: TriageFacts) -> None:
    tq1.tq1_1 = "1"
    tq1.tq1_9 = "S^Stat^HL70485" if facts.priority == "S" else "R^Routine^HL70485"


def observations(facts: TriageFacts) -> list[tuple[str, str, str, str]]:
    """Each OBX as (value type, observation name, value as ER7, unit as ER7), in order."""
    summary = facts.summary
    decision = summary.decision
    finding = f"{FINDING_CODES[decision]}^{escape(decision)}^{CODING_SYSTEM}"
    rows = [("CWE", "finding", finding, "")]
    if summary.probability is not None:
        rows.insert(0, ("NM", "probability", _number(summary.probability), "1^^UCUM"))
    rows.append(("ST", "model", escape(f"{summary.model_name} {summary.model_version}"), ""))
    if summary.threshold is not None:
        rows.append(("NM", "operating_point", _number(summary.threshold), "1^^UCUM"))
        rows.append(("ST", "operating_point_source", escape(facts.operating_point_source), ""))
    notice = MODE_NOTICES[facts.mode]
    rows.append(("ST", "mode", escape(f"{facts.mode}: {notice}" if notice else facts.mode), ""))
    if not summary.analysed:
        rows.append(("ST", "reason", escape(summary.reason), ""))
    return rows


def _obx(obx: Segment, number: int, value_type: str, name: str, value: str, unit: str, facts: TriageFacts) -> None:
    code, text = OBSERVATIONS[name]
    obx.obx_1 = str(number)
    obx.obx_2 = value_type
    obx.obx_3 = f"{code}^{escape(text)}^{CODING_SYSTEM}"
    obx.obx_5 = value
    if unit:
        obx.obx_6 = unit
    if name == "finding" and facts.summary.positive is not None:
        obx.obx_8 = "A" if facts.summary.positive else "N"
    obx.obx_11 = "P"
    obx.obx_14 = hl7_time(facts.result_time)


def _number(value: float) -> str:
    return f"{value:.4f}"


@dataclass(frozen=True)
class Ack:
    """What an answer says: its MSA-1 code, the control ID it acknowledges (MSA-2) and its text (MSA-3, ERR)."""

    code: str
    control_id: str
    text: str = ""


def read_ack(answer: bytes) -> Ack:
    """The acknowledgment in ``answer`` (one unframed message).

    Raises
    ------
    ValueError
        When it is not an HL7 message with an MSA segment.
    """
    try:
        text = answer.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r").strip("\r")
        message = hl7.parse(text)
        msa = message.segment("MSA")
        code = str(msa(1)).strip().upper() if len(msa) > 1 else ""
        control_id = message.unescape(str(msa(2))).strip() if len(msa) > 2 else ""
        detail = message.unescape(str(msa(3))).strip() if len(msa) > 3 else ""
        detail = detail or _err_text(message)
    except Exception as exc:
        raise ValueError(f"not an HL7 acknowledgment ({type(exc).__name__})") from exc
    return Ack(code, control_id, _UNSAFE.sub(" ", detail)[:200])


def _err_text(message: hl7.Message) -> str:
    try:
        err = message.segment("ERR")
    except KeyError:
        return ""
    return " ".join(part for part in (str(err(8)) if len(err) > 8 else "", str(err(3)) if len(err) > 3 else "")
                    if part).strip()  # fmt: skip


def judge(ack: Ack, control_id: str) -> StoreResult:
    """What ``ack`` means for the message ``control_id``: delivered (status Success), a failure to retry, or a
    permanent refusal."""
    said = f"the RIS answered {ack.code or 'no code'}{': ' + ack.text if ack.text else ''}"
    if ack.control_id != control_id:
        return StoreResult(None, None, f"the RIS acknowledged another message ({ack.control_id[:24]!r}, {said})")
    if ack.code in ACCEPTED:
        return StoreResult(None, status.SUCCESS, ack.code)
    if ack.code in REJECTED:
        return StoreResult(None, None, said, permanent=True)
    return StoreResult(None, None, said if ack.code in FAILED else f"unknown acknowledgment code ({said})")


def frame(message: bytes) -> bytes:
    """``message`` in an MLLP block.

    Raises
    ------
    ValueError
        When the message contains a framing byte (it cannot be framed).
    """
    if START in message or b"\x1c" in message:
        raise ValueError("an HL7 message cannot contain the MLLP framing bytes 0x0B or 0x1C")
    return START + message + END


class Hl7Transport:
    """ORU^R01 to a RIS over MLLP at ``host``/``port`` (TLS when ``tls`` is given), one connection per round.

    Its probe (and ``cxr-node echo``) opens a connection (and the TLS handshake) and closes it: it checks the
    address, the port and TLS; whether the RIS takes the messages only its ACKs can say.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        addressing: Addressing = Addressing(),
        tls: ClientTLS | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.addressing = addressing
        self.tls = tls

    @classmethod
    def of(cls, destination: Destination, timeout_s: float, sending_application: str) -> Hl7Transport:
        """The transport of a configured ``protocol: hl7`` destination."""
        if destination.host is None or destination.port is None:
            raise SendError(f"destination {destination.name} has no host and port")
        addressing = Addressing(
            sending_application, destination.receiving_application or "", destination.receiving_facility or ""
        )
        tls = ClientTLS(destination.ca_file, destination.cert_file, destination.key_file) if destination.tls else None
        return cls(destination.host, destination.port, timeout_s, addressing, tls)

    def __str__(self) -> str:
        return f"{self.host}:{self.port} (HL7 MLLP{', TLS' if self.tls else ''})"

    def connect(self) -> socket.socket:
        """A connected socket (TLS handshake done when configured).

        Raises
        ------
        SendError
            When the RIS cannot be reached or the TLS handshake fails; the message says why.
        """
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise SendError(f"{self} could not be reached: {_why(exc)}") from exc
        if self.tls is None:
            return raw
        try:
            return self.tls.context().wrap_socket(raw, server_hostname=self.host)
        except (OSError, SendError) as exc:
            raw.close()
            raise SendError(f"{self}: TLS failed: {_why(exc)}") from exc

    def probe(self, sop_classes: Sequence[str] = ()) -> frozenset[str]:
        """Connect and close (the MLLP connection test); every kind is assumed accepted.

        Raises
        ------
        SendError
            When the RIS cannot be reached.
        """
        self.connect().close()
        return frozenset(sop_classes)

    def open(self, sop_classes: Sequence[str] = (), refused: Collection[str] = ()) -> Hl7Link:
        """A connection for one delivery round.

        Raises
        ------
        SendError
            When the RIS cannot be reached.
        """
        return Hl7Link(self, self.connect(), frozenset(sop_classes) - frozenset(refused))


class Hl7Link:
    """One MLLP connection to a RIS for one delivery round: a message, its ACK, the next message."""

    def __init__(self, transport: Hl7Transport, connection: socket.socket, accepted: frozenset[str]) -> None:
        self.transport = transport
        self._connection: socket.socket | None = connection
        self._accepted = accepted
        self._alive = True

    @property
    def accepted(self) -> frozenset[str]:
        """The kinds this link sends."""
        return self._accepted

    @property
    def alive(self) -> bool:
        """False once the RIS could not be reached, dropped the connection or did not answer in time."""
        return self._alive

    def send(self, path: Path) -> StoreResult:
        """Not for HL7: a triage link sends messages (:meth:`deliver`), never files."""
        return StoreResult(path, None, "an HL7 destination takes triage messages, not DICOM files", permanent=True)

    def deliver(self, facts: TriageFacts) -> StoreResult:
        """Send the ORU^R01 of ``facts`` and judge its ACK."""
        try:
            block = frame(encode(facts, self.transport.addressing))
        except ValueError as exc:
            return StoreResult(None, None, f"the message cannot be built: {exc}", permanent=True)
        try:
            answer = self._exchange(block)
        except (OSError, SendError) as exc:
            self._alive = False
            self.close()
            return StoreResult(None, None, f"{self.transport}: {_why(exc)}")
        try:
            outcome = judge(read_ack(answer), facts.control_id)
        except ValueError as exc:
            outcome = StoreResult(None, None, f"the RIS's answer is {exc}")
        if not outcome.ok:
            self.close()  # the next message gets a fresh connection, never a confused one
        return outcome

    def _exchange(self, block: bytes) -> bytes:
        if self._connection is None:
            self._connection = self.transport.connect()
        self._connection.sendall(block)
        return read_block(self._connection)

    def close(self) -> None:
        """Close the connection (nothing happens when it is already closed)."""
        if self._connection is not None:
            try:
                self._connection.close()
            finally:
                self._connection = None


def read_block(connection: socket.socket) -> bytes:
    """Read one MLLP block from ``connection`` (bytes before the start byte are skipped); return its content.

    Raises
    ------
    ConnectionError
        When the peer closes the connection before the block ends.
    OSError
        When reading fails or times out (``TimeoutError``), or the block is over :data:`MAX_ACK_BYTES`.
    """
    received = bytearray()
    while END not in received:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("the RIS closed the connection before its acknowledgment")
        received += chunk
        if len(received) > MAX_ACK_BYTES:
            raise OSError(f"the RIS's answer is over {MAX_ACK_BYTES} bytes")
    start = received.find(START)
    end = received.find(END)
    return bytes(received[start + 1 if 0 <= start < end else 0 : end])


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); check ca_file"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the RIS"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

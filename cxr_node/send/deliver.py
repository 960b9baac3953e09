"""Delivering the outputs to every destination: probe, send in order of arrival, back off, give up, alarm.

One round (:meth:`Dispatcher.round`) opens at most one link per destination (an association, or an HTTP
connection for a DICOMweb destination: :mod:`cxr_node.send.transport`) and sends the due outputs of up to
``delivery.jobs_per_association`` jobs, oldest job first. A Success or warning status is delivered; a failure
status is retried with exponential backoff and jitter up to ``delivery.max_attempts`` (at once dead when the
transport knows a retry cannot succeed); no link or no response backs off the whole destination (its deliveries
keep their order and their attempt counts), so a PACS that was down for an hour gets the backlog in order of
arrival. Output kinds a destination does not accept (seen when probing, or in a STOW-RS answer) are recorded as
refused and raise an alarm. An output written in shadow mode (its go-live mode is recorded with it) is never sent
to a destination not marked ``qa``: such a delivery is recorded withheld (the worker records them so already;
this holds even for a delivery re-queued by hand or a destination whose ``qa`` mark was since removed).

A worklist triage destination (``protocol: hl7`` or ``fhir``, docs/triage-out.md) has deliveries of one kind
(``oru`` or ``fhir``) with no output file: each message is built when it is sent from the job's stored result and
source header (:class:`~cxr_node.send.triage.TriageReader`) and goes through the same claims, order, retries,
dead letters, withholding and probes. A message that cannot be built (no stored result) is dead at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import structlog
from structlog.contextvars import bound_contextvars

from cxr_node.config import DeliverySettings, Destination
from cxr_node.dicom import status
from cxr_node.errors import SendError
from cxr_node.jobs.interfaces import DeliveryStore
from cxr_node.jobs.leases import Holder, this_process
from cxr_node.jobs.records import DestinationState, Due
from cxr_node.jobs.states import WITHHELD_ERROR, DeliveryState
from cxr_node.results.kinds import REGISTRY
from cxr_node.send.scu import StoreResult
from cxr_node.send.transport import Link, Transport, TriageLink, transport_for
from cxr_node.send.triage import TriageError, TriageReader

log = structlog.get_logger("cxr_node.send")

OUTPUT_CLASSES: Final[dict[str, str]] = {kind.name: kind.sop_class_uid for kind in REGISTRY}
"""The SOP class of each output kind (proposed in the syntaxes of ``results.kinds.OUTPUT_TRANSFER_SYNTAXES``)."""
TRIAGE_CLASSES: Final[dict[str, str]] = {"oru": "HL7 v2.5 ORU^R01", "fhir": "FHIR R4 transaction Bundle"}
"""What a triage destination's link carries, by delivery kind (its "SOP class" for probes and refusals)."""
CLASSES: Final[dict[str, str]] = {**OUTPUT_CLASSES, **TRIAGE_CLASSES}


def backoff(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failures: doubling from ``initial`` up to ``maximum``,
    with "equal jitter" (between half and all of it) so many nodes do not retry in step."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, found {failures}")
    delay = min(maximum, initial * 2 ** min(failures - 1, 30))
    return float(delay / 2 + rng.random() * delay / 2)


class Dispatcher:
    """Sends written outputs to the configured destinations and records every outcome in the jobs store."""

    def __init__(
        self,
        store: DeliveryStore,
        root: Path,
        destinations: Sequence[Destination],
        settings: DeliverySettings,
        kinds: Sequence[str] = tuple(OUTPUT_CLASSES),
        rng: random.Random | None = None,
        holder: Holder | None = None,
        transports: Mapping[str, Transport] | None = None,
        reader: TriageReader | None = None,
    ) -> None:
        self.store = store
        self.holder = holder or this_process("sender")  # claims what it sends, so senders on many hosts share
        self.root = root
        self.destinations = list(destinations)
        self.settings = settings
        self.kinds: list[str] = [kind for kind in kinds if kind in OUTPUT_CLASSES]
        self.rng = rng or random.Random()  # noqa: S311 - retry jitter, not cryptography
        given = transports or {}
        self.transports = {d.name: given.get(d.name) or transport_for(d, settings) for d in self.destinations}
        self.reader = reader  # builds the triage messages from the store (needed with a triage destination)
        if reader is None and any(d.triage_kind for d in self.destinations):
            raise ValueError("a triage destination (protocol hl7 or fhir) needs a reader of the stored results")

    def kinds_for(self, destination: Destination) -> list[str]:
        """The delivery kinds ``destination`` gets: its triage kind, or the DICOM output kinds."""
        return [destination.triage_kind] if destination.triage_kind else self.kinds

    def _open(self, destination: Destination, kinds: Sequence[str], refused: Sequence[str]) -> tuple[Link | None, str]:
        classes = [CLASSES[kind] for kind in kinds]
        try:
            return self.transports[destination.name].open(classes, [CLASSES[k] for k in refused if k in CLASSES]), ""
        except SendError as exc:
            return None, str(exc)

    def probe(self, destination: Destination, now: float | None = None) -> DestinationState:
        """Negotiate the output SOP classes with ``destination`` and record which it accepts."""
        with bound_contextvars(destination=destination.name):
            return self._probe(destination, time.time() if now is None else now)

    def _probe(self, destination: Destination, now: float) -> DestinationState:
        previous = self.store.destinations().get(destination.name)
        kinds = self.kinds_for(destination)
        try:
            classes = self.transports[destination.name].probe([CLASSES[kind] for kind in kinds])
        except SendError as exc:
            return self._down(destination, previous, now, str(exc), probed=True)
        accepted = sorted(kind for kind in kinds if CLASSES[kind] in classes)
        refused = [kind for kind in kinds if kind not in accepted]
        state = DestinationState(destination.name, True, accepted, refused, None, now, None, 0.0, 0)
        self.store.save_destination(state)
        if refused:
            log.warning("destination.unmet", refused=refused, accepted=accepted)
            self.store.refuse(destination.name, refused)
        else:
            log.info("destination.probed", accepted=accepted)
        return state

    def _down(
        self, destination: Destination, previous: DestinationState | None, now: float, error: str, probed: bool = False
    ) -> DestinationState:
        failures = (previous.failures if previous else 0) + 1
        delay = backoff(failures, self.settings.backoff_initial_s, self.settings.backoff_max_s, self.rng)
        state = DestinationState(
            destination.name,
            False,
            previous.accepted if previous else [],
            previous.refused if previous else [],
            error,
            now if probed or previous is None else previous.probed_at,
            previous.down_since if previous and previous.down_since else now,
            now + delay,
            failures,
        )
        self.store.save_destination(state)
        log.warning("destination.down", error=error, retry_in_s=round(delay, 1), failures=failures)
        return state

    def round(self, now: float | None = None) -> int:
        """Send what is due to every destination; return how many outputs were delivered."""
        now = time.time() if now is None else now
        delivered = 0
        for destination in self.destinations:
            with bound_contextvars(destination=destination.name):
                delivered += self._round_one(destination, now)
        return delivered

    def _round_one(self, destination: Destination, now: float) -> int:
        state = self.store.destinations().get(destination.name)
        if state is not None and state.retry_at > now:
            return 0
        if state is None or not state.probed_at or (state.reachable is False and state.down_since is not None):
            state = self.probe(destination, now)
            if not state.reachable:
                return 0
        due = self.store.due(
            destination.name, now, self.settings.jobs_per_association, self.holder, self.settings.lease_s
        )
        due = self._withhold(destination, due)
        if not due:
            return 0
        return self._send(destination, state, due, now)

    def _withhold(self, destination: Destination, due: list[Due]) -> list[Due]:
        """Record withheld the outputs written in shadow mode that ``destination`` (not QA) must not get; return
        the others."""
        if destination.qa:
            return due
        for item in (item for item in due if item.mode == "shadow"):
            with bound_contextvars(job_id=item.job_id, kind=item.kind):
                finished = self.store.record(
                    item.job_id, destination.name, item.kind, DeliveryState.WITHHELD, None, WITHHELD_ERROR,
                    count_attempt=False,
                )  # fmt: skip
                log.info("send.withheld", mode=item.mode)
                if finished is not None:
                    log.info(f"job.{finished.value}")
        return [item for item in due if item.mode != "shadow"]

    def _send(self, destination: Destination, state: DestinationState, due: list[Due], now: float) -> int:
        kinds = sorted({item.kind for item in due})
        link, error = self._open(destination, kinds, state.refused)
        if link is None:
            self._down(destination, state, now, error)
            return 0
        delivered = 0
        try:
            refused = [kind for kind in kinds if CLASSES.get(kind) not in link.accepted]
            if refused:
                state = self._refuse(destination, state, refused)
            renewed = time.monotonic()
            for item in due:
                if item.kind in refused:
                    continue
                if time.monotonic() - renewed > self.settings.lease_s / 3:  # a slow destination: keep the claim
                    self.store.renew(self.holder, self.settings.lease_s)
                    renewed = time.monotonic()
                with bound_contextvars(job_id=item.job_id, kind=item.kind):
                    outcome = self._send_one(destination, link, item)
                    if outcome.status is None and not link.alive:
                        self._down(destination, state, time.time(), outcome.comment)
                        break
                    if outcome.refused:  # said in a STOW-RS answer: refuse the kind as a probe would
                        refused.append(item.kind)
                        state = self._refuse(destination, state, [item.kind], outcome.comment)
                        continue
                    delivered += self._record(destination, item, outcome)
        finally:
            link.close()
        if delivered and state.failures:
            self.store.save_destination(
                replace(state, reachable=True, down_since=None, retry_at=0.0, failures=0, error=None)
            )
            log.info("destination.up")
        return delivered

    def _send_one(self, destination: Destination, link: Link, item: Due) -> StoreResult:
        """Send one due item: a DICOM file, or the triage message built now from the job's stored result."""
        if destination.triage_kind is None:
            return link.send(self.root / item.path)
        if self.reader is None or not isinstance(link, TriageLink):  # pragma: no cover - refused at construction
            return StoreResult(None, None, "no triage link or reader for this destination", permanent=True)
        try:
            facts = self.reader.read(item.job_id, item.mode)
        except TriageError as exc:
            return StoreResult(None, None, str(exc), permanent=True)
        if facts.left_out:
            log.info("triage.values_left_out", attributes=list(facts.left_out))
        try:
            return link.deliver(facts)
        except Exception as exc:  # a bug building one job's message must not stop the others' deliveries
            log.exception("send.triage_error")
            return StoreResult(None, None, f"the message could not be sent: {type(exc).__name__}: {exc}"[:300])

    def _refuse(
        self, destination: Destination, state: DestinationState, kinds: list[str], comment: str = ""
    ) -> DestinationState:
        """Record ``kinds`` refused by ``destination`` (its open deliveries of them too), raise the alarm, and
        return the destination's state with them refused."""
        log.warning("destination.unmet", refused=kinds, **({"comment": comment} if comment else {}))
        self.store.refuse(destination.name, kinds)
        if not set(kinds) - set(state.refused):
            return state
        accepted = [kind for kind in state.accepted if kind not in kinds]
        state = replace(state, accepted=accepted, refused=sorted({*state.refused, *kinds}))
        self.store.save_destination(state)
        return state

    def _record(self, destination: Destination, item: Due, outcome: StoreResult) -> int:
        if outcome.ok:
            if outcome.status is not None and status.is_warning(outcome.status):
                log.warning("send.warning", status=f"0x{outcome.status:04X}", comment=outcome.comment)
            finished = self.store.record(
                item.job_id,
                destination.name,
                item.kind,
                DeliveryState.DELIVERED,
                outcome.status,
                outcome.comment or None,
            )
            log.info("send.delivered", status=f"0x{outcome.status:04X}")
            if finished is not None:
                log.info(f"job.{finished.value}")
            return 1
        attempts = item.attempts + 1
        error = outcome.comment or f"status 0x{(outcome.status or 0):04X}"
        if attempts >= self.settings.max_attempts or outcome.permanent:
            finished = self.store.record(
                item.job_id, destination.name, item.kind, DeliveryState.DEAD, outcome.status, error
            )
            log.error("send.dead", attempts=attempts, error=error, permanent=outcome.permanent)
            if finished is not None:
                log.error(f"job.{finished.value}")
            return 0
        delay = backoff(attempts, self.settings.backoff_initial_s, self.settings.backoff_max_s, self.rng)
        self.store.record(
            item.job_id,
            destination.name,
            item.kind,
            DeliveryState.FAILED,
            outcome.status,
            error,
            next_attempt_at=time.time() + delay,
        )
        log.warning("send.retry_scheduled", attempts=attempts, retry_in_s=round(delay, 1), error=error)
        return 0

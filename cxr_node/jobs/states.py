"""The state machines of DESIGN.md §6: which state of a job, and of one delivery, may follow which."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class JobState(StrEnum):
    """Where a job stands; stored as its value in the jobs database."""

    RECEIVED = "received"
    QUEUED = "queued"
    SKIPPED = "skipped"
    QUARANTINED = "quarantined"
    RUNNING = "running"
    INFERRED = "inferred"
    WRITTEN = "written"
    DELIVERED = "delivered"
    DEAD = "dead"


S = JobState
TRANSITIONS: Final[dict[JobState, frozenset[JobState]]] = {
    S.RECEIVED: frozenset({S.QUEUED, S.SKIPPED, S.QUARANTINED}),
    S.QUEUED: frozenset({S.RUNNING, S.SKIPPED}),
    S.RUNNING: frozenset({S.INFERRED, S.QUARANTINED, S.QUEUED, S.DEAD}),
    S.INFERRED: frozenset({S.WRITTEN, S.DEAD, S.QUEUED}),
    S.WRITTEN: frozenset({S.DELIVERED, S.DEAD}),
    S.DELIVERED: frozenset(),
    S.SKIPPED: frozenset(),
    S.QUARANTINED: frozenset({S.QUEUED}),
    S.DEAD: frozenset({S.QUEUED, S.WRITTEN}),
}
"""Allowed moves. Quarantined and dead jobs can be re-queued by an operator; nothing leaves delivered."""

VALUES_REPAIRED: Final = "values repaired: "
"""How a written job's reason starts when source values were repaired or left out of its outputs (``cxr-node
status`` counts them); the attribute names follow, never a value."""

TERMINAL: Final = frozenset(state for state, nexts in TRANSITIONS.items() if not nexts)


def can_move(source: JobState, target: JobState) -> bool:
    """Return True when a job in ``source`` may move to ``target``."""
    return target in TRANSITIONS[source]


def sources_of(target: JobState) -> frozenset[JobState]:
    """Return every state from which ``target`` can be reached."""
    return frozenset(state for state, nexts in TRANSITIONS.items() if target in nexts)


class DeliveryState(StrEnum):
    """Where one output's delivery to one destination stands; stored as its value."""

    PENDING = "pending"
    FAILED = "failed"
    DELIVERED = "delivered"
    REFUSED = "refused"
    DEAD = "dead"
    WITHHELD = "withheld"


D = DeliveryState
DELIVERY_TRANSITIONS: Final[dict[DeliveryState, frozenset[DeliveryState]]] = {
    D.PENDING: frozenset({D.FAILED, D.DELIVERED, D.REFUSED, D.DEAD, D.WITHHELD}),
    D.FAILED: frozenset({D.FAILED, D.DELIVERED, D.REFUSED, D.DEAD, D.PENDING, D.WITHHELD}),
    D.DELIVERED: frozenset({D.PENDING}),
    D.REFUSED: frozenset({D.PENDING}),
    D.DEAD: frozenset({D.PENDING}),
    D.WITHHELD: frozenset(),
}
"""Allowed moves. Every finished delivery can be sent again by an operator (``cxr-node resend``) but a withheld
one: an output written in shadow mode never reaches a clinical destination (its go-live mode is recorded with
the output, and a later change of mode does not rewrite it)."""

WITHHELD_ERROR: Final = "shadow mode: not sent to a clinical destination"
"""Why a delivery is withheld (its ``last_error``), and the reason of a delivered job some of whose deliveries
were."""

OPEN_DELIVERIES: Final = frozenset({D.PENDING, D.FAILED})
"""Deliveries still to be attempted."""


def delivery_sources_of(target: DeliveryState) -> frozenset[DeliveryState]:
    """Return every delivery state from which ``target`` can be reached."""
    return frozenset(state for state, nexts in DELIVERY_TRANSITIONS.items() if target in nexts)

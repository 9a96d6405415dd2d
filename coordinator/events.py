"""What the round engine hands back (messages to send) and what it reports (events).

The engine never touches a transport: every call returns the ``Outgoing`` messages to
deliver, and observers (benchmarks, progress bars) subscribe to the events below
instead of reaching into the engine's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outgoing:
    """One message to deliver.

    ``kind`` is a topic kind of ``fedmpq.topics`` (``task``, ``model_at``, ``control``,
    ``model``); ``client_id`` is the last topic level: the device for per-device kinds,
    the allocation key for ``model_at`` (``""``: all float32), ``None`` for a broadcast.
    An empty ``model_at`` payload clears that retained model.
    """

    kind: str
    client_id: str | None
    payload: bytes


@dataclass(frozen=True)
class FrameHandled:
    """A device frame was decoded and acted on (or rejected) in ``seconds``."""

    kind: str
    client_id: str | None
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class RoundOpened:
    """A round was opened (or extended) and ``outgoing`` is what it sends."""

    round: int
    outgoing: tuple[Outgoing, ...]


@dataclass(frozen=True)
class Evaluated:
    """The global model was evaluated on the test split in ``seconds``."""

    round: int
    seconds: float


@dataclass(frozen=True)
class RoundClosed:
    """A round was closed; ``row`` is its metrics row."""

    round: int
    row: dict[str, Any]


@dataclass(frozen=True)
class DevicesReady:
    """Enough devices were accounted for to start ``round`` (wall-clock ``at``)."""

    round: int
    at: float


@dataclass(frozen=True)
class RoundTimed:
    """A transport ran ``round`` in ``wall_s``, of which ``idle_s`` waiting for devices."""

    round: int
    wall_s: float
    idle_s: float


Event = FrameHandled | RoundOpened | Evaluated | RoundClosed | DevicesReady | RoundTimed
Observer = Callable[[Event], None]


class Observers:
    """The subscribers of one engine; ``emit`` calls each in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[Observer] = []

    def subscribe(self, observer: Observer) -> None:
        self._subscribers.append(observer)

    def emit(self, event: Event) -> None:
        for observer in self._subscribers:
            observer(event)

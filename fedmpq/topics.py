"""The MQTT topic layout shared by the coordinator and the devices.

Every topic lives under a configurable prefix (default ``"fedmpq"``) so several runs
or deployments can share one broker:

=============================  =====================  ===  ========  =========================
topic                          direction              QoS  retained  carries
=============================  =====================  ===  ========  =========================
``{prefix}/register/{id}``     device -> coordinator  1    no        registration
``{prefix}/status/{id}``       device -> coordinator  1    yes       online / offline (will)
``{prefix}/task/{id}``         coordinator -> device  1    no        the device's round task
``{prefix}/update/{id}``       device -> coordinator  1    no        the device's update
``{prefix}/model_at/{key}``    coordinator -> the     1    yes       the round's global model
                               selected devices                  at one allocation
``{prefix}/control``           coordinator -> all     1    yes       run / round announcements
``{prefix}/model``             coordinator -> all     1    yes       trained ONNX model
=============================  =====================  ===  ========  =========================

Only the devices selected for a round receive a training model: a device subscribes to
the ``model_at`` topic its task names (``TaskMessage.model_allocation``) while it waits
for that model, and the coordinator clears the retained models when the round closes.
Every other device sees only the round's small ``control`` announcement.

Device ids double as MQTT client ids and topic levels, so they are restricted to
``[A-Za-z0-9_.-]{1,64}``: no wildcards, no separators, nothing a broker may reject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from fedmpq.errors import ConfigError

REGISTER = "register"
STATUS = "status"
TASK = "task"
UPDATE = "update"
MODEL_AT = "model_at"
CONTROL = "control"
MODEL = "model"

#: Kinds whose topic ends in a device id.
PER_DEVICE_KINDS = frozenset({REGISTER, STATUS, TASK, UPDATE})
#: Kinds whose topic ends in an allocation key (``fedmpq.wire.downlink.allocation_key``).
PER_ALLOCATION_KINDS = frozenset({MODEL_AT})
#: Kinds that have one topic for the whole run.
BROADCAST_KINDS = frozenset({CONTROL, MODEL})
#: Kinds published with the retain flag, so a device that (re)connects late still sees them.
RETAINED_KINDS = frozenset({STATUS, MODEL_AT, CONTROL, MODEL})
#: Retained kinds only the coordinator publishes: it watches them and re-publishes its own
#: message over anyone else's (a forged retained message would hide it from late subscribers).
OWN_RETAINED_KINDS = frozenset({MODEL_AT, CONTROL, MODEL})
#: The ``model_at`` topic level of the all-float32 model (its allocation key is ``""``).
FLOAT_ALLOCATION = "float32"
#: Every fedmpq topic is QoS 1: at-least-once, deduplicated by the message's round number.
QOS = 1


class PublishOptions(NamedTuple):
    """How messages of one kind are published; pass as ``conn.publish(t, p, *opts)``."""

    qos: int
    retain: bool


#: The one table every ``publish`` call takes its QoS and retain flag from, by kind.
PUBLISH_OPTIONS = {
    kind: PublishOptions(QOS, kind in RETAINED_KINDS)
    for kind in (REGISTER, STATUS, TASK, UPDATE, MODEL_AT, CONTROL, MODEL)
}


def publish_options(kind: str) -> PublishOptions:
    """QoS and retain flag for messages of ``kind`` (``register``, ``status``, ...)."""
    try:
        return PUBLISH_OPTIONS[kind]
    except KeyError:
        known = sorted(PUBLISH_OPTIONS)
        raise ConfigError(f"unknown topic kind {kind!r}; known: {known}") from None


#: Payloads of the status topic; ``STATUS_OFFLINE`` is the device's last will.
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def validate_client_id(client_id: str) -> str:
    """Check that a device id is safe as an MQTT client id and topic level.

    Parameters
    ----------
    client_id
        The device id.

    Returns
    -------
    str
        ``client_id`` unchanged.

    Raises
    ------
    ConfigError
        If it is not 1 to 64 characters of ``A-Z a-z 0-9 _ . -``.
    """
    if not isinstance(client_id, str) or _CLIENT_ID.fullmatch(client_id) is None:
        raise ConfigError(
            f"invalid device id {client_id!r}: "
            "use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.', '-'"
        )
    return client_id


@dataclass(frozen=True)
class Topics:
    """Topic names of one deployment, all under ``prefix``.

    ``prefix`` is one or more ``/``-separated levels, each 1 to 64 characters of
    ``A-Z a-z 0-9 _ . -`` (so it never holds a wildcard or an empty level).
    """

    prefix: str = "fedmpq"

    def __post_init__(self) -> None:
        levels = self.prefix.split("/") if isinstance(self.prefix, str) else [""]
        if not all(_PREFIX_LEVEL.fullmatch(level) for level in levels):
            raise ConfigError(
                f"invalid topic prefix {self.prefix!r}: use '/'-separated levels of 1 to 64 "
                "characters from A-Z, a-z, 0-9, '_', '.', '-' (no wildcards, no empty levels)"
            )

    def register(self, client_id: str) -> str:
        """Topic a device announces itself on (device -> coordinator)."""
        return self._per_device(REGISTER, client_id)

    def status(self, client_id: str) -> str:
        """Retained online/offline status of a device; its last will goes here."""
        return self._per_device(STATUS, client_id)

    def task(self, client_id: str) -> str:
        """Topic the coordinator sends a device its round task on."""
        return self._per_device(TASK, client_id)

    def update(self, client_id: str) -> str:
        """Topic a device sends its model update on (device -> coordinator)."""
        return self._per_device(UPDATE, client_id)

    def model_at(self, allocation: str) -> str:
        """Retained topic holding the open round's global model at ``allocation`` (an
        allocation key; ``""``, the all-float32 model, is the level ``float32``)."""
        level = allocation or FLOAT_ALLOCATION
        if _CLIENT_ID.fullmatch(level) is None:
            raise ConfigError(f"invalid allocation key {allocation!r}")
        return f"{self.prefix}/{MODEL_AT}/{level}"

    @property
    def control(self) -> str:
        """Retained topic holding the current run announcement."""
        return f"{self.prefix}/{CONTROL}"

    @property
    def model(self) -> str:
        """Retained topic holding the trained model for on-device inference (ONNX)."""
        return f"{self.prefix}/{MODEL}"

    @property
    def coordinator_subscriptions(self) -> tuple[str, ...]:
        """Wildcard filters the coordinator subscribes to: register, status and update."""
        return tuple(f"{self.prefix}/{kind}/+" for kind in (REGISTER, STATUS, UPDATE))

    @property
    def coordinator_retained(self) -> tuple[str, ...]:
        """Filters of the retained topics the coordinator owns (see ``OWN_RETAINED_KINDS``)."""
        return (f"{self.prefix}/{MODEL_AT}/+", self.control, self.model)

    def device_subscriptions(self, client_id: str) -> tuple[str, ...]:
        """Topics a device always subscribes to: its task, control and the trained model
        (the ``model_at`` topic only while a task waits for that model)."""
        return (self.task(client_id), self.control, self.model)

    def parse(self, topic: str) -> tuple[str, str | None] | None:
        """Classify a topic of this layout.

        Parameters
        ----------
        topic
            A topic a message arrived on.

        Returns
        -------
        tuple of (str, str or None), or None
            ``(kind, client_id)`` for per-device topics, ``(kind, level)`` for
            ``model_at`` (``level`` as :meth:`model_at` writes it), ``(kind, None)`` for
            ``control`` and ``model``; ``None`` for anything else (another prefix,
            an unknown kind, extra levels, an invalid device id).  Returning ``None``
            rather than raising lets a subscriber drop whatever a misbehaving client
            publishes under a wildcard without a try block.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head) :].split("/")
        if len(levels) == 1 and levels[0] in BROADCAST_KINDS:
            return levels[0], None
        if (
            len(levels) == 2
            and levels[0] in PER_DEVICE_KINDS | PER_ALLOCATION_KINDS
            and _CLIENT_ID.fullmatch(levels[1]) is not None
        ):
            return levels[0], levels[1]
        return None

    def _per_device(self, kind: str, client_id: str) -> str:
        return f"{self.prefix}/{kind}/{validate_client_id(client_id)}"

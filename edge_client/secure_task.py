"""A device's side of one secure round, between the runtime's two threads.

The task carries the round's setup; the device advertises its keys at once, before it
trains.  The coordinator's roster, forwarded shares and unmasking request arrive on the
task topic and are answered on the MQTT loop thread (each is milliseconds of work), so
the key exchange runs while the worker thread trains.  The masked input goes out when
both the forwarded shares and the trained codes (from the worker) are there, whichever
comes last.  Every answer comes from the round's one :class:`DeviceSession`, which gives
a re-sent question the same answer and never sends the codes unmasked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_client.device import SecureCodes
from edge_client.downlink_check import DownlinkCheck
from fedmpq.errors import DecodeError
from fedmpq.secagg import DeviceSession, SecAggError
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyRoster,
    MaskedInput,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.wire.codec import DecodeLimits, decode_body, decode_envelope
from fedmpq.wire.messages import TaskMessage

log = logging.getLogger("fedmpq.agent")

Answer = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse
Question = KeyRoster | ForwardedShares | UnmaskRequest
_QUESTIONS = frozenset(c.MESSAGE_TYPE for c in (KeyRoster, ForwardedShares, UnmaskRequest))


class SecureTask:
    """One device's secure aggregation in one round.

    Parameters
    ----------
    task
        The round's task; ``task.secagg`` must be set and name this run and round.
    publish
        Sends an answer on the device's update topic (signed there).

    Raises
    ------
    SecAggError
        If the setup is not this task's or this device is not in it.
    """

    def __init__(self, task: TaskMessage, publish: Callable[[Answer], None]) -> None:
        setup = task.secagg
        if setup is None or (setup.run_id, setup.round) != (task.run_id, task.round):
            raise SecAggError("the task's secure-aggregation setup is for another round")
        self.round = task.round
        self.session = DeviceSession(task.client_id, setup)
        self.publish = publish
        self._lock = threading.Lock()  # the loop thread asks, the worker brings the codes
        self._inbox: ForwardedShares | None = None
        self._codes: SecureCodes | None = None

    def advertise(self) -> None:
        """Step 2 (also when the task comes again: the same keys)."""
        self.publish(self.session.advertise())

    def answer(self, question: Question) -> None:
        """Answer the coordinator's ``question`` (loop thread).

        Raises
        ------
        SecAggError, DecodeError
            For a question the session refuses (nothing is sent).
        """
        with self._lock:
            if isinstance(question, KeyRoster):
                self.publish(self.session.share_keys(question))
            elif isinstance(question, ForwardedShares):
                self._inbox = question
                self._mask_when_ready()
            else:
                self.publish(self.session.unmask(question))

    def trained(self, codes: SecureCodes) -> None:
        """Local training is done: mask ``codes`` once the shares are there (worker)."""
        with self._lock:
            self._codes = codes
            try:
                self._mask_when_ready()
            except (SecAggError, DecodeError) as exc:
                log.warning("%s: cannot mask round %d: %s", self.session.client_id, self.round, exc)

    def _mask_when_ready(self) -> None:
        if self._inbox is not None and self._codes is not None:
            masked = self.session.masked_input(self._inbox, self._codes.codes, self._codes.bits)
            self.publish(masked)


def answer_frame(
    secure: SecureTask | None,
    check: DownlinkCheck,
    client_id: str,
    payload: bytes,
    limits: DecodeLimits,
) -> bool:
    """Answer a secure-aggregation question that arrived on the device's task topic (on the
    loop thread, so the key exchange does not wait for training); False for any other
    frame, which the worker handles."""
    try:
        env = decode_envelope(payload, limits)
    except DecodeError:
        return False  # the worker's check refuses it, with its rate-limited log
    if env.type not in _QUESTIONS:
        return False
    # Its own sequence: these frames are read here, the task on the worker.
    if not check.admit(client_id, "secagg", payload, limits):
        return True
    try:
        question: Question = decode_body(env, None, limits)  # type: ignore[assignment]
        if secure is None or question.round != secure.round:
            log.info("%s: no secure round %d here", client_id, question.round)
            return True
        secure.answer(question)
    except DecodeError as exc:
        log.warning("%s: rejected task message: %s", client_id, exc)
    except SecAggError as exc:
        log.warning("%s: refused secure-aggregation step: %s", client_id, exc)
    return True


def dump_codes(directory: Path, client_id: str, task: TaskMessage, codes: SecureCodes) -> Path:
    """Write this device's own codes and its grid to ``directory`` (``np.savez``, no pickle):
    the device's own data on its own disk, for checking a secure sum end to end."""
    assert task.secagg is not None
    arrays: dict[str, np.ndarray] = {}
    for layer in task.secagg.layers:
        arrays[f"codes/{layer.name}"] = codes.codes[layer.name]
        arrays[f"grid/{layer.name}"] = np.array(
            [codes.bits[layer.name], layer.bits, layer.scale], dtype=np.float64
        )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{client_id}-round{task.round}.npz"
    with path.open("wb") as fh:
        np.savez(fh, *[], **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle

    return path

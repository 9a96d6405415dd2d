"""What the coordinator sends, as sent: task tokens, run announcements and signed frames."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from coordinator.events import Outgoing
from fedmpq.topics import CONTROL
from fedmpq.wire.codec import encode, sign_frame
from fedmpq.wire.messages import ControlMessage
from fedmpq.wire.signing import CoordinatorSigner


class Outbound:
    """Tokens, control messages and signatures of one run's outgoing frames."""

    def __init__(self, run_id: str, signer: CoordinatorSigner | None) -> None:
        self.run_id = run_id
        self.signer = signer
        # A task's token is an HMAC of (run, round, device) under a per-process secret: an
        # update must echo it, which only whoever received the task can (without keys).
        self._token_secret = secrets.token_bytes(32)

    def task_token(self, round: int, client_id: str) -> str:
        """The token of ``client_id``'s task in ``round`` (echoed by its update)."""
        text = f"{self.run_id}/{round}/{client_id}".encode()
        return hmac.new(self._token_secret, text, hashlib.sha256).hexdigest()[:32]

    def signed(self, messages: list[Outgoing]) -> list[Outgoing]:
        """``messages`` as published: with keys, each frame signed by the coordinator with a
        fresh sequence (the transport calls this for everything it sends)."""
        signer = self.signer
        if signer is None:
            return messages
        # An empty payload is no frame: it is how a retained model is cleared (MQTT).
        return [
            Outgoing(m.kind, m.client_id, sign_frame(m.payload, signer) if m.payload else b"")
            for m in messages
        ]

    def control(self, state: str, round: int, detail: str = "") -> Outgoing:
        """The run announcement ``state`` for ``round`` (to every device)."""
        msg = ControlMessage(self.run_id, state, round, detail, time.time())
        return Outgoing(CONTROL, None, encode(msg))

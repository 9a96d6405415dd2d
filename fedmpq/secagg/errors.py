"""The one error type of secure aggregation's protocol logic."""

from __future__ import annotations

from fedmpq.errors import FedmpqError


class SecAggError(FedmpqError):
    """A secure-aggregation step cannot go on as asked.

    Too few devices left for the threshold, a message from another round or an unknown
    device, a second answer where one is allowed, or an unmasking request that would
    reveal an individual update.  Malformed bytes raise :class:`fedmpq.errors.DecodeError`.
    """

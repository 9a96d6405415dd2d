"""Typed errors.  Each one carries a message that says what to fix in the input."""

from __future__ import annotations


class FedmpqError(Exception):
    """Base class of every error fedmpq raises on purpose."""


class DecodeError(FedmpqError, ValueError):
    """A message or tensor payload could not be decoded or failed validation.

    The decoder raises nothing else, whatever the bytes.
    """


class LayoutMismatchError(DecodeError):
    """A model frame names another model layout than the receiver's (another model, number
    of classes or input shape)."""


class BudgetError(FedmpqError):
    """A device cannot train the model within its resources at any allowed precision."""


class ConfigError(FedmpqError, ValueError):
    """A run configuration, device profile or command-line option is invalid."""


class PayloadTooLargeError(FedmpqError):
    """A message is larger than the broker or the configured limit accepts."""


class TransportError(FedmpqError):
    """The MQTT connection failed in a way the caller must hear about."""

"""The strict msgpack codec for the messages in ``fedmpq.wire.messages``.

A frame is a msgpack map ``{"v", "type", "codec", "body", "sig"}``; ``body`` is
the msgpack map of the message's fields (nested dataclasses as maps, ``bytes`` as
bin), zstd-compressed when ``codec == "zstd"``.  ``sig`` is a device's HMAC or the
coordinator's Ed25519 signature over the frame's head and wire body
(``fedmpq.wire.signing``); :func:`encode` signs, :func:`sign_frame` signs a frame
already encoded, and the ``verify_*`` functions check an :class:`Envelope` before its
body is decompressed or parsed.

Tensors travel positionally (since protocol version 2): a message's ``tensors`` field is
an array in layout order (``fedmpq.wire.layout``), each tensor ``[bits, data]`` for
floats or ``[bits, scheme, axis, scale, zero_point, data]`` when quantized (scheme
0 = symmetric, 1 = affine), with no names, shapes or map keys.  Next to it, the
body's ``layout`` field holds only the layout's digest; decoding such a message needs
the layout: the caller's own model's (``layout=``, e.g. ``fedmpq.state.model_layout``),
or one this process has encoded a message of.  Since version 3 a quantized tensor's
per-slice ``scale`` is a float32 reference and a byte a slice (``fedmpq.quant_scales``)
instead of a float32 a slice; since version 4 a ``GlobalModelMessage`` on the link
carries the digest too, and only one written to a file (``inline_layout``) the layout
itself.

Encoding is canonical: fields in declaration order, map keys sorted, ints as
ints and floats as float64 (float32 would round learning rates, timestamps and
metrics, and float64 costs 4 bytes a field on messages dominated by tensor data).

Decoding trusts nothing.  Whatever the input, the only exception that leaves
``decode``/``decode_envelope``/``decode_body`` is ``DecodeError``, whose message
names the offending field by path (``update.tensors[3].data``).  The schema check
is one recursive converter driven by the dataclass annotations (``schema``); semantic
checks are a table of per-field rules plus one function for ``TensorPayload``
(``checks``); positional tensors are resolved against their layout (``positional``);
msgpack and zstd parse under explicit limits (``unpack``).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, fields
from typing import Any, TypeAlias, TypeVar, overload

import msgpack
import zstandard

from fedmpq import PROTOCOL_VERSION
from fedmpq.errors import DecodeError
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyRoster,
    LayerGrid,
    MaskedInput,
    MaskedTensor,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmpq.wire.checks import CONTROL_STATES, DEFAULT_LIMITS, STATUS_STATES, DecodeLimits
from fedmpq.wire.layout import ModelLayout
from fedmpq.wire.messages import (
    MESSAGE_TYPES,
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    ModelMessage,
    NoticeMessage,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    TensorPayload,
    UpdateMessage,
)
from fedmpq.wire.positional import convert_message, message_to_wire
from fedmpq.wire.schema import convert, describe
from fedmpq.wire.signing import CoordinatorSigner, coordinator_sequence, frame_mac
from fedmpq.wire.unpack import decompress, unpack

__all__ = [
    "CODECS",
    "CONTROL_STATES",
    "DEFAULT_LIMITS",
    "STATUS_STATES",
    "DecodeLimits",
    "Envelope",
    "Message",
    "body_bytes",
    "decode",
    "decode_body",
    "decode_envelope",
    "encode",
    "sign_frame",
    "verify_coordinator",
    "verify_envelope",
]

Message: TypeAlias = (
    RegisterMessage
    | TaskMessage
    | GlobalModelMessage
    | UpdateMessage
    | StatusMessage
    | ControlMessage
    | ModelMessage
    | NoticeMessage
    | AdvertiseKeys
    | KeyRoster
    | ShareKeys
    | ForwardedShares
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
)
M = TypeVar("M", bound=Message)

CODEC_NONE = "none"
CODEC_ZSTD = "zstd"
CODECS = frozenset({CODEC_NONE, CODEC_ZSTD})

_ZSTD_LEVEL = 3
#: Message types without tensors or a model are small: their bodies stay under this.
_SMALL_BODY_BYTES = 2**20
_BULK_TYPES = frozenset({"global_model", "update", "model", MaskedInput.MESSAGE_TYPE})


@dataclass(frozen=True)
class Envelope:
    """A checked frame whose body is not decoded yet (e.g. to verify ``sig`` over ``body``)."""

    version: int
    type: str
    codec: str
    body: bytes
    sig: bytes


@dataclass
class _Frame:
    """The frame map exactly as it is on the wire (short key ``v``)."""

    v: int
    type: str
    codec: str
    body: bytes
    sig: bytes


#: Fields of the widest dataclass, so that msgpack's map limit never cuts a record short.
_WIDEST_RECORD = max(
    len(fields(cls))
    for cls in (
        _Frame,
        TensorPayload,
        DeviceProfile,
        ResourceUsage,
        SecAggSetup,
        LayerGrid,
        MaskedTensor,
        *MESSAGE_TYPES.values(),
    )
)

# --------------------------------------------------------------------------- encoding


def _message_type(msg: object) -> str:
    name = getattr(msg, "MESSAGE_TYPE", None)
    if not isinstance(name, str) or MESSAGE_TYPES.get(name) is not type(msg):
        raise TypeError(f"cannot encode {type(msg).__name__}: not a fedmpq.wire.messages message")
    return name


def body_bytes(msg: Message, *, inline_layout: bool = False) -> bytes:
    """The canonical, uncompressed body of ``msg``: what a signature covers.

    Parameters
    ----------
    msg
        Any message of ``fedmpq.wire.messages.MESSAGE_TYPES``.
    inline_layout
        Write a ``GlobalModelMessage``'s layout itself instead of its digest: for a file,
        which a process may read without building the model.

    Returns
    -------
    bytes
        Msgpack of the message's fields; equal messages give equal bytes.
    """
    _message_type(msg)
    return msgpack.packb(message_to_wire(msg, inline_layout), use_bin_type=True)


def encode(
    msg: Message,
    *,
    compress: bool = False,
    sig: bytes = b"",
    key: bytes | CoordinatorSigner | None = None,
    inline_layout: bool = False,
) -> bytes:
    """Encode ``msg`` as one frame.

    Parameters
    ----------
    msg
        Any message of ``fedmpq.wire.messages.MESSAGE_TYPES``.  It is not validated
        here; the receiving ``decode`` does that.
    compress
        zstd-compress the body (with its content size, which the decoder requires).
    sig
        Opaque signature bytes carried alongside the body.
    key
        Sign the frame (``fedmpq.wire.signing``): with a device key (HMAC) or the
        coordinator's signer (Ed25519, with a fresh sequence); overrides ``sig``.
    inline_layout
        As in :func:`body_bytes`: for files, never the link.

    Returns
    -------
    bytes
        The frame; deterministic for a given message, ``compress`` and ``sig`` (and device
        key; a coordinator signature carries a fresh sequence every time).
    """
    body = body_bytes(msg, inline_layout=inline_layout)
    if compress:
        body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
    codec = CODEC_ZSTD if compress else CODEC_NONE
    if key is not None:
        sig = _signature(key, PROTOCOL_VERSION, _message_type(msg), codec, body)
    return _frame_bytes(
        {"v": PROTOCOL_VERSION, "type": _message_type(msg), "codec": codec}, body, bytes(sig)
    )


def _signature(
    key: bytes | CoordinatorSigner, version: int, msg_type: str, codec: str, body: bytes
) -> bytes:
    if isinstance(key, CoordinatorSigner):
        return key.sign(version, msg_type, codec, body)
    return frame_mac(key, version, msg_type, codec, body)


def sign_frame(frame: bytes, key: bytes | CoordinatorSigner) -> bytes:
    """``frame`` (one this process encoded) signed with ``key``, replacing its ``sig``.

    The transport signs here, at the one place every outgoing frame passes, so every
    message kind is covered and each publication (a re-send too) gets a fresh sequence.
    """
    env = decode_envelope(frame)
    sig = _signature(key, env.version, env.type, env.codec, env.body)
    head = {"v": env.version, "type": env.type, "codec": env.codec}
    return _frame_bytes(head, env.body, sig)


def _bin_header(size: int) -> bytes:
    """msgpack's bin8/bin16/bin32 header for ``size`` bytes."""
    if size < 2**8:
        return struct.pack(">BB", 0xC4, size)
    if size < 2**16:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def _frame_bytes(head: dict[str, Any], body: bytes, sig: bytes) -> bytes:
    """``msgpack.packb({**head, "body": body, "sig": sig})``, copying ``body`` only once."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(head) + 2)]
    parts += [packer.pack(x) for kv in head.items() for x in kv]
    parts += [packer.pack("body"), _bin_header(len(body)), body]
    parts += [packer.pack("sig"), packer.pack(sig)]
    return b"".join(parts)


# --------------------------------------------------------------------------- decoding


def _message_class(env: Envelope) -> type:
    if env.version < PROTOCOL_VERSION:
        raise DecodeError(
            f"frame.v: frame version {env.version} is no longer supported; this build speaks "
            f"{PROTOCOL_VERSION}: upgrade the agent/coordinator that sent it"
        )
    if env.version > PROTOCOL_VERSION:
        raise DecodeError(
            f"frame.v: frame version {env.version} is newer than this build's "
            f"{PROTOCOL_VERSION}: upgrade this agent/coordinator"
        )
    cls = MESSAGE_TYPES.get(env.type)
    if cls is None:
        raise DecodeError(f"frame.type: unknown message type {env.type!r}")
    if env.codec not in CODECS:
        raise DecodeError(
            f"frame.codec: unknown codec {env.codec!r} (expected one of {sorted(CODECS)})"
        )
    return cls


def verify_envelope(env: Envelope, key: bytes) -> bool:
    """True if ``env`` carries a valid signature under the device ``key``.

    Check it before :func:`decode_body`: a forged frame is then never decompressed or parsed.
    """
    expected = frame_mac(key, env.version, env.type, env.codec, env.body)
    return hmac.compare_digest(expected, env.sig)


def verify_coordinator(env: Envelope, public_key: bytes) -> int | None:
    """The sequence of ``env`` if the coordinator of ``public_key`` signed it, else None.

    Check it before :func:`decode_body`, and refuse a sequence older than the last one
    accepted of the same type (``fedmpq.wire.signing``).
    """
    return coordinator_sequence(public_key, env.version, env.type, env.codec, env.body, env.sig)


def decode_envelope(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Envelope:
    """Parse and check a frame, leaving its body undecoded.

    Parameters
    ----------
    data
        The raw frame, untrusted.
    limits
        Bounds on sizes; ``max_message_bytes`` is checked before parsing.

    Returns
    -------
    Envelope
        Version, type and codec are known to this build.

    Raises
    ------
    DecodeError
        For any input that is not such a frame; nothing else is raised.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"frame: expected bytes, got {describe(data)}")
    if len(data) > limits.max_message_bytes:
        raise DecodeError(
            f"frame: {len(data)} bytes, over the limit of {limits.max_message_bytes} "
            "(DecodeLimits.max_message_bytes)"
        )
    raw = unpack(data, "frame", limits.max_message_bytes, limits, _WIDEST_RECORD)
    frame = convert(raw, _Frame, "frame", limits)
    env = Envelope(frame.v, frame.type, frame.codec, frame.body, frame.sig)
    _message_class(env)
    return env


@overload
def decode_body(
    env: Envelope,
    expected: type[M],
    limits: DecodeLimits = ...,
    *,
    layout: ModelLayout | None = ...,
) -> M: ...
@overload
def decode_body(
    env: Envelope,
    expected: None = None,
    limits: DecodeLimits = ...,
    *,
    layout: ModelLayout | None = ...,
) -> Message: ...
def decode_body(
    env: Envelope,
    expected: type[Any] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    layout: ModelLayout | None = None,
) -> Message:
    """Decompress, parse and validate the body of a checked frame.

    Parameters
    ----------
    env
        From ``decode_envelope`` (after, say, verifying ``env.sig`` over ``env.body``).
    expected
        The message class the caller wants; any other type is a ``DecodeError``.
    limits
        Bounds on sizes, element counts and strings.
    layout
        The model layout the caller expects tensors in (its own model's); a frame of
        another layout is a ``DecodeError`` naming both digests.  Without it, a
        message with tensors must name a layout this process has encoded.

    Returns
    -------
    Message
        A message whose every field passed the schema and semantic checks.

    Raises
    ------
    DecodeError
        For any body that is not such a message; nothing else is raised.
    """
    cls = _message_class(env)
    if expected is not None and cls is not expected:
        raise DecodeError(
            f"frame.type: expected a {expected.MESSAGE_TYPE!r} message, got {env.type!r}"
        )
    where = f"{env.type} body"
    limit = limits.max_decompressed_bytes
    if env.type not in _BULK_TYPES:
        limit = min(limit, _SMALL_BODY_BYTES)
    body = decompress(env.body, where, limit) if env.codec == CODEC_ZSTD else env.body
    raw = unpack(body, where, limits.max_decompressed_bytes, limits, _WIDEST_RECORD)
    return convert_message(raw, cls, env.type, limits, layout)


@overload
def decode(
    data: bytes, expected: type[M], limits: DecodeLimits = ..., *, layout: ModelLayout | None = ...
) -> M: ...
@overload
def decode(
    data: bytes,
    expected: None = None,
    limits: DecodeLimits = ...,
    *,
    layout: ModelLayout | None = ...,
) -> Message: ...
def decode(
    data: bytes,
    expected: type[Any] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    layout: ModelLayout | None = None,
) -> Message:
    """Decode and validate one frame: ``decode_body(decode_envelope(data))``.

    Parameters
    ----------
    data
        The raw frame, untrusted.
    expected
        The message class the caller wants; any other type is a ``DecodeError``.
    limits
        Bounds on sizes, element counts and strings.
    layout
        As in :func:`decode_body`.

    Returns
    -------
    Message
        A validated message of type ``expected`` when given.

    Raises
    ------
    DecodeError
        For any input that is not such a frame; nothing else is raised.
    """
    return decode_body(decode_envelope(data, limits), expected, limits, layout=layout)

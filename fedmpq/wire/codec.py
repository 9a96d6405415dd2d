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
body's ``layout`` field holds the layout itself in a ``GlobalModelMessage`` and
only its digest elsewhere; decoding such a message needs a layout this process has
seen (in a global model, or by encoding a message of that layout).  Since version 3
a quantized tensor's per-slice ``scale`` is a float32 reference and a byte a slice
(``fedmpq.quant_scales``) instead of a float32 a slice.

Encoding is canonical: fields in declaration order, map keys sorted, ints as
ints and floats as float64 (float32 would round learning rates, timestamps and
metrics, and float64 costs 4 bytes a field on messages dominated by tensor data).

Decoding trusts nothing.  Whatever the input, the only exception that leaves
``decode``/``decode_envelope``/``decode_body`` is ``DecodeError``, whose message
names the offending field by path (``update.tensors[3].data``).  The schema check
is one recursive converter driven by the dataclass annotations (``schema``); semantic
checks are a table of per-field rules plus one function for ``TensorPayload``
(``checks``); positional tensors are resolved against their layout (``positional``).
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
#: A zstd body may declare at most this many times its compressed size.  Real bodies
#: (packed codes, float weights) compress about 1.0-1.3x; a bomb declares thousands.
_MAX_ZSTD_RATIO = 64
#: Message types without tensors or a model are small: their bodies stay under this.
_SMALL_BODY_BYTES = 2**20
_BULK_TYPES = frozenset({"global_model", "update", "model", MaskedInput.MESSAGE_TYPE})
_UTF8_MAX_BYTES_PER_CHAR = 4


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


def body_bytes(msg: Message) -> bytes:
    """The canonical, uncompressed body of ``msg``: what a signature covers.

    Parameters
    ----------
    msg
        Any message of ``fedmpq.wire.messages.MESSAGE_TYPES``.

    Returns
    -------
    bytes
        Msgpack of the message's fields; equal messages give equal bytes.
    """
    _message_type(msg)
    return msgpack.packb(message_to_wire(msg), use_bin_type=True)


def encode(
    msg: Message,
    *,
    compress: bool = False,
    sig: bytes = b"",
    key: bytes | CoordinatorSigner | None = None,
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

    Returns
    -------
    bytes
        The frame; deterministic for a given message, ``compress`` and ``sig`` (and device
        key; a coordinator signature carries a fresh sequence every time).
    """
    body = body_bytes(msg)
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


# --------------------------------------------------------------------------- parsing


#: What each msgpack limit stands for, to name the problem when one trips.
_MSGPACK_LIMITS = {
    "max_array_len": "an array is longer than DecodeLimits.max_tensors",
    "max_map_len": "a map has more entries than DecodeLimits.max_map_entries",
    "max_str_len": "a string is longer than 4 * DecodeLimits.max_string_len bytes",
    "max_bin_len": "a bin is longer than the frame or body limit",
    "max_ext_len": "msgpack extension types are not part of the protocol",
}


def _unpack(data: bytes, where: str, max_bin_len: int, limits: DecodeLimits) -> Any:
    """Msgpack-parse untrusted bytes under explicit size limits."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            # Bytes, not characters: the converter checks the exact character count.
            max_str_len=_UTF8_MAX_BYTES_PER_CHAR * limits.max_string_len,
            # The tensors list is the longest legitimate array.
            max_array_len=limits.max_tensors,
            max_map_len=max(limits.max_map_entries, _WIDEST_RECORD),
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise DecodeError(f"{where}: trailing bytes after the msgpack object") from None
    except UnicodeDecodeError as e:
        raise DecodeError(f"{where}: a string is not valid UTF-8 ({e.reason})") from None
    except (msgpack.StackError, RecursionError):
        raise DecodeError(f"{where}: arrays or maps nested too deeply") from None
    except msgpack.FormatError:
        raise DecodeError(f"{where}: not valid msgpack (reserved type byte 0xc1)") from None
    # Otherwise msgpack reports hostile input as ValueError, TypeError or MemoryError
    # depending on the build; all of them mean "bad bytes".
    except Exception as e:
        reason = next((r for k, r in _MSGPACK_LIMITS.items() if k in str(e)), "not valid msgpack")
        raise DecodeError(f"{where}: {reason} ({type(e).__name__}: {e})") from e


def _decompress(body: bytes, where: str, limit: int) -> bytes:
    """zstd-decompress one frame whose header must declare a size within ``limit`` and
    within ``_MAX_ZSTD_RATIO`` times the frame's own size.

    Both are checked before anything is allocated: requiring the content size keeps the
    allocation bounded by that declaration (``encode`` always writes it), and the ratio
    makes a bomb cost its sender bandwidth in proportion to the work it causes here.
    """
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise DecodeError(f"{where}: not a zstd frame ({e})") from None
    if size < 0:
        raise DecodeError(f"{where}: zstd frame does not declare its content size")
    if size > limit:
        raise DecodeError(
            f"{where}: zstd frame declares {size} bytes, over the limit of {limit} "
            "(DecodeLimits.max_decompressed_bytes; 1 MiB for messages without tensors)"
        )
    if size > _MAX_ZSTD_RATIO * len(body):
        raise DecodeError(
            f"{where}: zstd frame of {len(body)} bytes declares {size} bytes, over "
            f"{_MAX_ZSTD_RATIO} times its size (a decompression bomb?)"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(
            body, max_output_size=size, allow_extra_data=False
        )
    except Exception as e:  # ZstdError, or MemoryError for a size the host cannot give
        raise DecodeError(f"{where}: zstd decompression failed ({e})") from e
    if len(out) != size:
        raise DecodeError(f"{where}: zstd frame gave {len(out)} bytes, declared {size}")
    return out


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
    raw = _unpack(data, "frame", limits.max_message_bytes, limits)
    frame = convert(raw, _Frame, "frame", limits)
    env = Envelope(frame.v, frame.type, frame.codec, frame.body, frame.sig)
    _message_class(env)
    return env


@overload
def decode_body(env: Envelope, expected: type[M], limits: DecodeLimits = ...) -> M: ...
@overload
def decode_body(env: Envelope, expected: None = None, limits: DecodeLimits = ...) -> Message: ...
def decode_body(
    env: Envelope, expected: type[Any] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
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
    body = _decompress(env.body, where, limit) if env.codec == CODEC_ZSTD else env.body
    raw = _unpack(body, where, limits.max_decompressed_bytes, limits)
    return convert_message(raw, cls, env.type, limits)


@overload
def decode(data: bytes, expected: type[M], limits: DecodeLimits = ...) -> M: ...
@overload
def decode(data: bytes, expected: None = None, limits: DecodeLimits = ...) -> Message: ...
def decode(
    data: bytes, expected: type[Any] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
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

    Returns
    -------
    Message
        A validated message of type ``expected`` when given.

    Raises
    ------
    DecodeError
        For any input that is not such a frame; nothing else is raised.
    """
    return decode_body(decode_envelope(data, limits), expected, limits)

"""Untrusted bytes to msgpack data, under explicit limits: the codec's parsing step.

Both functions raise ``DecodeError`` naming ``where`` for any input they refuse, and
nothing else.
"""

from __future__ import annotations

from typing import Any

import msgpack
import zstandard

from fedmpq.errors import DecodeError
from fedmpq.wire.checks import DecodeLimits

#: A zstd body may declare at most this many times its compressed size.  Real bodies
#: (packed codes, float weights) compress about 1.0-1.3x; a bomb declares thousands.
MAX_ZSTD_RATIO = 64
_UTF8_MAX_BYTES_PER_CHAR = 4

#: What each msgpack limit stands for, to name the problem when one trips.
_MSGPACK_LIMITS = {
    "max_array_len": "an array is longer than DecodeLimits.max_tensors",
    "max_map_len": "a map has more entries than DecodeLimits.max_map_entries",
    "max_str_len": "a string is longer than 4 * DecodeLimits.max_string_len bytes",
    "max_bin_len": "a bin is longer than the frame or body limit",
    "max_ext_len": "msgpack extension types are not part of the protocol",
}


def unpack(
    data: bytes, where: str, max_bin_len: int, limits: DecodeLimits, min_map_len: int
) -> Any:
    """Msgpack-parse untrusted bytes under explicit size limits.

    ``min_map_len`` is the widest record's field count: the map limit never cuts one short.
    """
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
            max_map_len=max(limits.max_map_entries, min_map_len),
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


def decompress(body: bytes, where: str, limit: int) -> bytes:
    """zstd-decompress one frame whose header must declare a size within ``limit`` and
    within ``MAX_ZSTD_RATIO`` times the frame's own size.

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
    if size > MAX_ZSTD_RATIO * len(body):
        raise DecodeError(
            f"{where}: zstd frame of {len(body)} bytes declares {size} bytes, over "
            f"{MAX_ZSTD_RATIO} times its size (a decompression bomb?)"
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

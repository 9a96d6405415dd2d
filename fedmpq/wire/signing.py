"""Per-device keys and HMAC-SHA256 frame signatures.

Broker authentication and ACLs are the first wall; signatures are the second, so a
device cannot speak for another even on a shared broker.  A signature covers the
protocol version, the message type, the body codec and the body exactly as it is on
the wire (compressed or not), so a forged or altered frame is rejected before its
body is decompressed or parsed.  The body carries the run id, round and client id,
which is what makes a replay of an old update detectable (stale round, duplicate).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedmpq.errors import ConfigError
from fedmpq.topics import validate_client_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY_BYTES = 32


def frame_mac(key: bytes, version: int, msg_type: str, codec: str, body: bytes) -> bytes:
    """HMAC-SHA256 of a frame's version, type, codec and wire body under ``key``."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(f"fedmpq/{version}/{msg_type}/{codec}/".encode())
    mac.update(body)
    return mac.digest()


def verify_mac(
    key: bytes, version: int, msg_type: str, codec: str, body: bytes, sig: bytes
) -> bool:
    """True if ``sig`` is the frame's signature under ``key`` (constant-time compare)."""
    return hmac.compare_digest(frame_mac(key, version, msg_type, codec, body), sig)


def generate_keys(client_ids: Iterable[str]) -> dict[str, bytes]:
    """A fresh random key for each device id."""
    return {validate_client_id(cid): secrets.token_bytes(KEY_BYTES) for cid in client_ids}


def write_keyring(path: str | Path, keys: Mapping[str, bytes]) -> None:
    """Write ``keys`` as TOML (``[keys]`` id = hex), readable by its owner only."""
    lines = ["# fedmpq device keys: keep secret; one per device", "[keys]"]
    lines += [f'"{cid}" = "{key.hex()}"' for cid, key in sorted(keys.items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def load_keyring(path: str | Path) -> dict[str, bytes]:
    """Read a key file written by :func:`write_keyring` (or by hand in the same form)."""
    try:
        table = tomllib.loads(Path(path).read_text()).get("keys")
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"key file {path} is not valid TOML: {exc}") from exc
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"key file {path}: needs a [keys] table of device id = hex key")
    keys = {}
    for cid, value in table.items():
        try:
            key = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            key = b""
        if len(key) < 16:
            raise ConfigError(f"key file {path}: key of {cid!r} must be >= 16 bytes of hex")
        keys[validate_client_id(cid)] = key
    return keys

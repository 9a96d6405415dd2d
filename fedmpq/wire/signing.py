"""Frame signatures: HMAC-SHA256 per device (uplink), Ed25519 for the coordinator (downlink).

Broker authentication and ACLs are the first wall; signatures are the second, so a
device cannot speak for another, and nobody but the coordinator can speak to a device,
even on a shared broker.  A signature covers the protocol version, the message type,
the body codec and the body exactly as it is on the wire (compressed or not), so a
forged or altered frame is rejected before its body is decompressed or parsed.

Uplink: a device's body carries the run id, round and client id, which is what makes a
replay of an old update detectable (stale round, duplicate).  Downlink: the coordinator's
signature also covers a sequence number (nanoseconds since the epoch at signing, strictly
increasing per signer) carried in the signature itself; a device accepts a frame of a
kind only if its sequence is not older than the last one it accepted of that kind, so a
captured frame cannot be played back after a newer one.

One key file serves both (``fedmpq keys``): ``[keys]`` device id = hex HMAC key, and
``[coordinator]`` with the Ed25519 ``public_key`` (every device needs it) and, in the
coordinator's copy only, its ``private_key``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmpq.errors import ConfigError
from fedmpq.topics import validate_client_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY_BYTES = 32
#: A coordinator signature: the 8-byte big-endian sequence, then the 64-byte Ed25519 signature.
COORDINATOR_SIG_BYTES = 8 + 64


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


# --------------------------------------------------------------------------- coordinator


def _signed_bytes(seq: int, version: int, msg_type: str, codec: str, body: bytes) -> bytes:
    """What a coordinator signature covers: the frame's head, the sequence and the body's
    SHA-256 (hashing once keeps signing a large model as cheap as signing a small one)."""
    head = f"fedmpq-coordinator/{version}/{msg_type}/{codec}/".encode()
    return head + struct.pack(">Q", seq) + hashlib.sha256(body).digest()


class CoordinatorSigner:
    """Signs the coordinator's frames with its Ed25519 key and a strictly increasing sequence.

    Thread-safe: the sequence never repeats, even when two threads sign at once.
    """

    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)
        self._lock = threading.Lock()
        self._last = 0

    def next_sequence(self) -> int:
        """Nanoseconds since the epoch, or one more than the last when the clock stalls;
        a restarted coordinator continues above what it signed before (its clock moved on)."""
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def sign(self, version: int, msg_type: str, codec: str, body: bytes) -> bytes:
        """The ``sig`` field of a frame: sequence (8 bytes) + Ed25519 signature (64 bytes)."""
        seq = self.next_sequence()
        signature = self._key.sign(_signed_bytes(seq, version, msg_type, codec, body))
        return struct.pack(">Q", seq) + signature


def coordinator_sequence(
    public_key: bytes, version: int, msg_type: str, codec: str, body: bytes, sig: bytes
) -> int | None:
    """The sequence of a frame the coordinator signed, or None if ``sig`` does not verify."""
    if len(sig) != COORDINATOR_SIG_BYTES:
        return None
    (seq,) = struct.unpack(">Q", sig[:8])
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            sig[8:], _signed_bytes(seq, version, msg_type, codec, body)
        )
    except InvalidSignature:
        return None
    return int(seq)


def generate_coordinator_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as raw bytes: (private, public)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


# --------------------------------------------------------------------------- key files


@dataclass(frozen=True)
class KeyFile:
    """What a key file holds: device keys and the coordinator's key pair (or public half)."""

    keys: dict[str, bytes]
    coordinator_public: bytes | None = None
    coordinator_private: bytes | None = field(default=None, repr=False)

    def signer(self, path: str | Path) -> CoordinatorSigner:
        """The coordinator's signer; ``ConfigError`` when this file has no private key."""
        if self.coordinator_private is None:
            raise ConfigError(
                f"key file {path}: no [coordinator] private_key; make the coordinator's file "
                "with `fedmpq keys` (it signs everything it sends to devices)"
            )
        return CoordinatorSigner(self.coordinator_private)

    def require_public(self, path: str | Path) -> bytes:
        """The coordinator's public key; ``ConfigError`` when this file has none."""
        if self.coordinator_public is None:
            raise ConfigError(
                f"key file {path}: no [coordinator] public_key; enroll the device with a file "
                "written by `fedmpq keys` (it verifies everything the coordinator sends)"
            )
        return self.coordinator_public


def _toml_lines(keys: Mapping[str, bytes], public: bytes | None, private: bytes | None) -> str:
    lines = ["# fedmpq keys: keep secret (fedmpq keys)"]
    if public is not None:
        lines += ["[coordinator]", f'public_key = "{public.hex()}"']
        if private is not None:
            lines += [f'private_key = "{private.hex()}"  # the coordinator\'s copy only']
    lines += ["[keys]"] + [f'"{cid}" = "{key.hex()}"' for cid, key in sorted(keys.items())]
    return "\n".join(lines) + "\n"


def write_keyring(
    path: str | Path,
    keys: Mapping[str, bytes],
    *,
    coordinator_public: bytes | None = None,
    coordinator_private: bytes | None = None,
) -> None:
    """Write ``keys`` (and the coordinator's key) as TOML, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_toml_lines(keys, coordinator_public, coordinator_private))


def write_key_files(
    out: str | Path, client_ids: Iterable[str], device_dir: str | Path | None = None
) -> KeyFile:
    """Enroll ``client_ids``: the coordinator's file ``out`` (every device key and the
    coordinator's key pair) and, with ``device_dir``, one ``<id>.toml`` per device (its own
    key and the coordinator's public key).

    An existing ``out`` keeps its coordinator key pair and device keys (re-running adds
    devices without re-enrolling the fleet).
    """
    existing = load_key_file(out) if Path(out).exists() else KeyFile({})
    keys = dict(existing.keys)
    ids = [validate_client_id(cid) for cid in client_ids]
    keys.update(generate_keys(cid for cid in ids if cid not in keys))
    private, public = existing.coordinator_private, existing.coordinator_public
    if private is None or public is None:
        private, public = generate_coordinator_key()
    write_keyring(out, keys, coordinator_public=public, coordinator_private=private)
    if device_dir is not None:
        Path(device_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        for cid in ids:
            write_keyring(
                Path(device_dir) / f"{cid}.toml", {cid: keys[cid]}, coordinator_public=public
            )
    return KeyFile(keys, public, private)


def _hex_key(path: str | Path, what: str, value: object, size: int | None) -> bytes:
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if (size is None and len(key) < 16) or (size is not None and len(key) != size):
        wanted = ">= 16 bytes" if size is None else f"{size} bytes"
        raise ConfigError(f"key file {path}: {what} must be {wanted} of hex")
    return key


def load_key_file(path: str | Path) -> KeyFile:
    """Read a key file written by :func:`write_keyring` (or by hand in the same form)."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"key file {path} is not valid TOML: {exc}") from exc
    table = doc.get("keys")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"key file {path}: needs a [keys] table of device id = hex key")
    keys = {
        validate_client_id(cid): _hex_key(path, f"key of {cid!r}", v, None)
        for cid, v in table.items()
    }
    coord = doc.get("coordinator", {})
    if not isinstance(coord, dict):
        raise ConfigError(f"key file {path}: [coordinator] must be a table")
    public = private = None
    if "public_key" in coord:
        public = _hex_key(path, "[coordinator] public_key", coord["public_key"], 32)
    if "private_key" in coord:
        private = _hex_key(path, "[coordinator] private_key", coord["private_key"], 32)
        derived = Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
        if public != derived:
            raise ConfigError(f"key file {path}: [coordinator] keys do not belong together")
    return KeyFile(keys, public, private)


def load_keyring(path: str | Path) -> dict[str, bytes]:
    """The device keys of a key file (see :func:`load_key_file`)."""
    return load_key_file(path).keys

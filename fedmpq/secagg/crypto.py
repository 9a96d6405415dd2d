"""The cryptographic primitives of one secure-aggregation round, all from ``cryptography``.

* key agreement: X25519, one fresh key pair per purpose, device and round;
* key derivation: HKDF-SHA256 of the X25519 secret, bound to the run, the round, the
  purpose and the pair of devices, so no derived key is ever used twice;
* share transport: ChaCha20-Poly1305 (AEAD) under the pairwise derived key;
* mask expansion: the ChaCha20 keystream of a 32-byte seed read as little-endian unsigned
  words (8, 16 or 32 bits), which are uniform modulo any ``2**k`` up to the word's width.
"""

from __future__ import annotations

import struct
from functools import cache

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedmpq.errors import DecodeError

KEY_BYTES = 32
SEED_BYTES = 32
#: ``purpose`` of the key that encrypts the share exchange between two devices.
PURPOSE_SHARES = b"fedmpq-secagg/shares"
#: ``purpose`` of the seed of the mask two devices add with opposite signs.
PURPOSE_MASK = b"fedmpq-secagg/pairwise-mask"

# Every seed and AEAD key is used for one stream or one message per direction, so the
# ChaCha20 nonce can be constant; the AEAD nonce tells the two directions apart.
_STREAM_NONCE = bytes(16)


def context(*parts: str | int) -> bytes:
    """An unambiguous byte string naming a run, round and devices (length-prefixed parts)."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part.to_bytes(8, "big", signed=True)
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 key from the operating system's randomness."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw private key (what Shamir shares, so dropped devices can be unmasked)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_private_key(data: bytes) -> X25519PrivateKey:
    """A private key from its 32 raw bytes; :class:`DecodeError` if they are not 32."""
    try:
        return X25519PrivateKey.from_private_bytes(data)
    except ValueError as exc:
        raise DecodeError(f"not an X25519 private key: {exc}") from None


def check_public_key(data: bytes, *, agree: bool = False) -> bytes:
    """``data`` if it is a raw X25519 public key, else :class:`DecodeError`.

    With ``agree``, also reject a low-order point, with which every agreement gives the
    all-zero secret (:func:`derive` refuses it anyway, but only when it is used); the
    coordinator checks so at once, to keep such a key out of the roster.
    """
    try:
        key = X25519PublicKey.from_public_bytes(data)
        if agree:
            _probe_key().exchange(key)
    except ValueError as exc:
        raise DecodeError(f"not a usable X25519 public key: {exc}") from None
    return data


def derive(key: X25519PrivateKey, peer_public: bytes, purpose: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 secret of ``key`` and ``peer_public``: 32 bytes.

    Both devices of a pair derive the same bytes when they pass the same ``info``.

    Raises
    ------
    DecodeError
        If ``peer_public`` is not a public key, or a low-order point that would make the
        shared secret all zeros.
    """
    try:
        secret = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise DecodeError(f"key agreement with a bad public key: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose + info).derive(
        secret
    )


def seal(key: bytes, sender: int, receiver: int, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` from device ``sender`` to ``receiver``."""
    return ChaCha20Poly1305(key).encrypt(_aead_nonce(sender, receiver), plaintext, associated)


def open_sealed(
    key: bytes, sender: int, receiver: int, ciphertext: bytes, associated: bytes
) -> bytes:
    """The plaintext :func:`seal` encrypted; :class:`DecodeError` if it was tampered with."""
    try:
        return ChaCha20Poly1305(key).decrypt(_aead_nonce(sender, receiver), ciphertext, associated)
    except InvalidTag:
        raise DecodeError(
            f"share ciphertext from device {sender} to {receiver} failed authentication"
        ) from None


def mask_words(seed: bytes, count: int, dtype: np.dtype) -> np.ndarray:
    """``count`` pseudo-random words of the unsigned ``dtype`` expanded from a 32-byte ``seed``.

    The same seed gives the same stream, whatever ``dtype``'s byte order on the host.
    """
    if len(seed) != SEED_BYTES:
        raise DecodeError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _STREAM_NONCE), mode=None).encryptor()
    # The keystream is the encryption of zeros; the array is a read-only view of it.
    word = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(encryptor.update(bytes(word.itemsize * count)), dtype=word)


@cache
def _probe_key() -> X25519PrivateKey:
    # Agreements with it are only ever checked for failure, never used.
    return X25519PrivateKey.generate()


def _aead_nonce(sender: int, receiver: int) -> bytes:
    return struct.pack(">III", sender, receiver, 0)

"""Signed frames: the coordinator accepts a device's frames only under its own key."""

from __future__ import annotations

import time

import pytest

from fedmpq.errors import ConfigError
from fedmpq.keys_cli import main as keys_main
from fedmpq.wire.codec import decode_envelope, encode, verify_envelope
from fedmpq.wire.messages import StatusMessage
from fedmpq.wire.signing import generate_keys, load_keyring, write_keyring


def status(cid="device-0000"):
    return StatusMessage(cid, "online", 1, "", time.time())


@pytest.mark.parametrize("compress", [False, True])
def test_signed_frame_verifies_only_under_its_key(compress):
    keys = generate_keys(["device-0000", "device-0001"])
    frame = encode(status(), compress=compress, key=keys["device-0000"])
    env = decode_envelope(frame)
    assert verify_envelope(env, keys["device-0000"])
    assert not verify_envelope(env, keys["device-0001"])


def test_any_flipped_body_byte_breaks_the_signature():
    key = generate_keys(["device-0000"])["device-0000"]
    env = decode_envelope(encode(status(), key=key))
    for i in range(len(env.body)):
        body = bytearray(env.body)
        body[i] ^= 0x01
        forged = type(env)(env.version, env.type, env.codec, bytes(body), env.sig)
        assert not verify_envelope(forged, key)


def test_unsigned_frame_does_not_verify():
    key = generate_keys(["device-0000"])["device-0000"]
    assert not verify_envelope(decode_envelope(encode(status())), key)


def test_keyring_round_trip_and_permissions(tmp_path):
    path = tmp_path / "keys.toml"
    assert keys_main(["--out", str(path), "--count", "3"]) == 0
    keys = load_keyring(path)
    assert sorted(keys) == ["device-0000", "device-0001", "device-0002"]
    assert len(set(keys.values())) == 3
    assert path.stat().st_mode & 0o777 == 0o600
    write_keyring(path, keys)
    assert load_keyring(path) == keys


@pytest.mark.parametrize(
    "text,message",
    [("", "needs a \\[keys\\] table"), ('[keys]\n"d" = "zz"\n', "16 bytes"), ("[keys", "TOML")],
)
def test_bad_key_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_keyring(path)

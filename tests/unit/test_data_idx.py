"""The IDX reader and writer: hand-written and corrupt files, gzip, round trips."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpq.data import read_idx, write_idx
from fedmpq.errors import ConfigError


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes() + payload


def test_read_idx_hand_written(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(0x08, (2, 3, 4), images.tobytes()))
    got = read_idx(tmp_path / "a.idx")
    np.testing.assert_array_equal(got, images)
    got[0, 0, 0] = 7  # writable

    values = np.array([-1.5, 2.25], dtype=">f4")
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(idx_bytes(0x0D, (2,), values.tobytes()))
    got = read_idx(tmp_path / "b.gz")
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, [-1.5, 2.25])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (idx_bytes(0x08, (2, 3), bytes(5)), "truncated"),
        (idx_bytes(0x08, (2, 3), bytes(7)), "longer"),
        (b"\x01\x00" + idx_bytes(0x08, (2,), bytes(2))[2:], "magic"),
        (idx_bytes(0x07, (2,), bytes(2)), "type code"),
        (bytes([0, 0, 8, 3, 0, 0]), "header"),
        (bytes([0, 0, 8, 0]), "zero dimensions"),
        (b"\x00\x00", "too short"),
    ],
)
def test_read_idx_rejects_corrupt(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_and_missing(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match="gzip"):
        read_idx(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", "i2", "i4", "f4", "f8"]),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(dtype: str, shape: list[int], gz: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.gz" if gz else "x.idx")
        write_idx(path, arr)
        got = read_idx(path)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_write_idx_rejects_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))

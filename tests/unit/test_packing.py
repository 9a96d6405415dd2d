"""Tests for fedmpq.packing: exact layout, round trips and input validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmpq.errors import DecodeError
from fedmpq.packing import _CHUNK_WORDS, pack_bits, packed_nbytes, unpack_bits

BITS = st.integers(min_value=1, max_value=8)
# Lengths around a 64-bit word (8 codes) plus arbitrary ones, odd included.
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65]),
    st.integers(min_value=0, max_value=3000),
)
FLAT_SHAPES = LENGTHS.map(lambda n: (n,))


def reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """The layout spelled out bit by bit: code i's bit j is stream bit i*bits + j."""
    stream = (codes.reshape(-1, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


@st.composite
def codes_and_bits(
    draw: st.DrawFn, shapes: st.SearchStrategy[tuple[int, ...]] = FLAT_SHAPES
) -> tuple[np.ndarray, int]:
    bits = draw(BITS)
    codes = draw(
        hnp.arrays(
            np.uint8, draw(shapes), elements=st.integers(min_value=0, max_value=(1 << bits) - 1)
        )
    )
    return codes, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_round_trip_matches_reference_layout(case: tuple[np.ndarray, int]) -> None:
    codes, bits = case
    packed = pack_bits(codes, bits)
    assert isinstance(packed, bytes)
    assert len(packed) == packed_nbytes(codes.size, bits)
    assert packed == reference_pack(codes, bits)
    unpacked = unpack_bits(packed, bits, codes.size)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_bits(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)))
def test_multidimensional_codes_pack_in_c_order(case: tuple[np.ndarray, int]) -> None:
    codes, bits = case
    packed = pack_bits(codes, bits)
    assert packed == pack_bits(codes.ravel(order="C"), bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size), codes.ravel())


@settings(max_examples=50, deadline=None)
@given(codes_and_bits(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=20)))
def test_non_contiguous_codes_are_read_in_logical_order(case: tuple[np.ndarray, int]) -> None:
    codes, bits = case
    assert pack_bits(codes.T, bits) == reference_pack(np.ascontiguousarray(codes.T), bits)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint64])
def test_wider_integer_dtypes_pack_like_uint8(dtype: type) -> None:
    codes = np.arange(37, dtype=np.uint8) % 32
    assert pack_bits(codes.astype(dtype), 5) == pack_bits(codes, 5)


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 2], 4, b"\x21"),
        ([0xA, 0xB, 0xC], 4, b"\xba\x0c"),
        # 001 010 011 100 101 110 111 000, each written LSB first.
        ([1, 2, 3, 4, 5, 6, 7, 0], 3, b"\xd1\x58\x1f"),
        ([3, 0, 1, 2, 3], 2, b"\x93\x03"),
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, b"\x0d\x01"),
        ([0x7F, 0x01], 7, b"\xff\x00"),
        ([0x55, 0x2A, 0x03], 7, b"\x55\xd5\x00"),
        ([0x3F], 6, b"\x3f"),
        ([0xFF, 0x00, 0x80], 8, b"\xff\x00\x80"),
    ],
)
def test_golden_vectors(codes: list[int], bits: int, expected: bytes) -> None:
    array = np.array(codes, dtype=np.uint8)
    assert pack_bits(array, bits) == expected
    np.testing.assert_array_equal(unpack_bits(expected, bits, len(codes)), array)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 5, 7, 9, 13])
def test_padding_bits_are_zero(bits: int, count: int) -> None:
    packed = pack_bits(np.full(count, (1 << bits) - 1, dtype=np.uint8), bits)
    used = count * bits % 8
    expected_last = (1 << used) - 1 if used else 0xFF
    assert packed[-1] == expected_last


@pytest.mark.parametrize("bits", range(1, 9))
def test_empty_input(bits: int) -> None:
    assert pack_bits(np.zeros(0, dtype=np.uint8), bits) == b""
    assert unpack_bits(b"", bits, 0).shape == (0,)


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_out_of_range_is_rejected(bits: int) -> None:
    codes = np.zeros(20, dtype=np.uint8)
    codes[11] = 1 << bits
    with pytest.raises(ValueError, match=rf"max code {1 << bits} .*{bits} bits"):
        pack_bits(codes, bits)


def test_negative_code_is_rejected() -> None:
    with pytest.raises(ValueError, match="min code -1"):
        pack_bits(np.array([0, -1, 2], dtype=np.int16), 4)


def test_unchecked_codes_pack_as_their_low_bits() -> None:
    codes = np.array([0x13, 0xF5, 0x2A, 0xFF, 0x10, 0x01, 0x08, 0x07, 0x3C], dtype=np.uint8)
    assert pack_bits(codes, 3, check=False) == pack_bits(codes & 0x07, 3)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.0, True])
def test_bad_bit_width_is_rejected(bits: object) -> None:
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        pack_bits(np.zeros(4, dtype=np.uint8), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        unpack_bits(b"\x00", bits, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_non_integer_codes_are_rejected(dtype: type) -> None:
    with pytest.raises(TypeError, match="integer array"):
        pack_bits(np.zeros(4, dtype=dtype), 4)


def test_negative_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="count must be >= 0"):
        unpack_bits(b"", 4, -1)


@pytest.mark.parametrize(("bits", "count", "length"), [(4, 3, 1), (4, 3, 3), (3, 8, 2), (1, 0, 1)])
def test_wrong_data_length_is_a_decode_error(bits: int, count: int, length: int) -> None:
    expected = packed_nbytes(count, bits)
    with pytest.raises(DecodeError, match=rf"must be {expected} bytes, got {length}"):
        unpack_bits(bytes(length), bits, count)


@settings(max_examples=200, deadline=None)
@given(BITS, LENGTHS, st.data())
def test_any_bytes_of_the_right_length_unpack_to_valid_codes(
    bits: int, count: int, data: st.DataObject
) -> None:
    nbytes = packed_nbytes(count, bits)
    raw = data.draw(st.binary(min_size=nbytes, max_size=nbytes))
    codes = unpack_bits(raw, bits, count)
    assert codes.shape == (count,)
    assert codes.dtype == np.uint8
    assert int(codes.max(initial=0)) < 1 << bits
    # Repacking reproduces the input except for the padding bits, which it zeroes.
    repacked = pack_bits(codes, bits)
    used = count * bits % 8
    if used and raw:
        raw = raw[:-1] + bytes([raw[-1] & ((1 << used) - 1)])
    assert repacked == raw


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, dtype=np.uint8)],
    ids=["bytes", "bytearray", "memoryview", "ndarray"],
)
def test_unpack_accepts_buffer_types(wrap: Callable[[bytes], object]) -> None:
    codes = np.arange(21, dtype=np.uint8) % 8
    packed = pack_bits(codes, 3)
    np.testing.assert_array_equal(unpack_bits(wrap(packed), 3, codes.size), codes)  # type: ignore[arg-type]


def test_unpack_reads_a_buffer_slice_without_touching_its_neighbours() -> None:
    codes = np.arange(19, dtype=np.uint8) % 32
    packed = pack_bits(codes, 5)
    # Bytes either side of the slice would corrupt the last codes if read.
    framed = bytearray(b"\xff" + packed + b"\xff")
    before = bytes(framed)
    view = memoryview(framed)[1:-1]
    np.testing.assert_array_equal(unpack_bits(view, 5, codes.size), codes)
    assert bytes(framed) == before


def test_unpack_rejects_non_uint8_arrays() -> None:
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(np.zeros(2, dtype=np.uint16), 4, 8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_inputs_are_not_mutated(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001, dtype=np.uint8)
    codes_before = codes.copy()
    packed = np.frombuffer(pack_bits(codes, bits), dtype=np.uint8).copy()
    packed_before = packed.copy()
    unpack_bits(packed, bits, codes.size)
    np.testing.assert_array_equal(codes, codes_before)
    np.testing.assert_array_equal(packed, packed_before)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpacked_array_owns_its_memory(bits: int) -> None:
    packed = bytearray(pack_bits(np.ones(24, dtype=np.uint8), bits))
    codes = unpack_bits(packed, bits, 24)
    packed[:] = bytes(len(packed))
    assert codes.flags.writeable
    np.testing.assert_array_equal(codes, np.ones(24, dtype=np.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_large_input_spanning_several_chunks(bits: int) -> None:
    # Crosses the kernels' chunk boundaries and ends in a partial chunk and a tail.
    count = 8 * (2 * _CHUNK_WORDS + 37) + 5
    rng = np.random.default_rng(100 + bits)
    codes = rng.integers(0, 1 << bits, size=count, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed == reference_pack(codes, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)

"""IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the number of
dimensions -- then one big-endian uint32 per dimension, then the values in C order,
big-endian.  Plain numpy and gzip: nothing is unpickled.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedmpq.errors import ConfigError

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return f.read()
            with gzip.GzipFile(fileobj=f) as gz:
                return gz.read()
    except FileNotFoundError:
        raise ConfigError(f"IDX file {path} does not exist") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ConfigError(f"IDX file {path} is not a valid gzip stream: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read IDX file {path}: {e}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected from its first bytes).

    Parameters
    ----------
    path
        The file to read.

    Returns
    -------
    ndarray
        A writable array with the file's dimensions, in native byte order.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, not IDX, has an unknown type code, or its payload
        is shorter or longer than its dimensions say.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ConfigError(f"IDX file {path} is too short ({len(data)} bytes) to hold a header")
    if data[0] != 0 or data[1] != 0:
        raise ConfigError(
            f"IDX file {path} has bad magic {data[:4].hex()}: the first two bytes must be zero"
        )
    code, ndim = data[2], data[3]
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ConfigError(f"IDX file {path} has unknown type code 0x{code:02x}")
    if ndim == 0:
        raise ConfigError(f"IDX file {path} declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ConfigError(f"IDX file {path} is truncated inside its {ndim}-dimension header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise ConfigError(
            f"IDX file {path} is {what}: dimensions {shape} need {expected} payload bytes, "
            f"found {actual}"
        )
    flat = np.frombuffer(data, dtype=dtype, offset=header_len)
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray, *, compresslevel: int = 9) -> None:
    """Write ``array`` as an IDX file; gzip-compressed if ``path`` ends in ``.gz``.

    The gzip header carries no timestamp or file name, so equal arrays give equal bytes.

    Parameters
    ----------
    path
        Destination file.
    array
        uint8, int8, int16, int32, float32 or float64 data with 1 to 255 dimensions.
    compresslevel
        gzip level (1-9), used for ``.gz`` paths only.

    Raises
    ------
    ConfigError
        If the dtype or the number of dimensions cannot be stored in IDX.
    """
    path = Path(path)
    arr = np.asarray(array)
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ConfigError(
            f"IDX cannot store dtype {arr.dtype}; use one of uint8, int8, "
            "int16, int32, float32, float64"
        )
    if not 1 <= arr.ndim <= 255:
        raise ConfigError(f"IDX stores 1 to 255 dimensions, got {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ConfigError(f"IDX dimensions must be below 2**32, got {arr.shape}")
    payload = (
        bytes([0, 0, code, arr.ndim])
        + np.asarray(arr.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes()
    )
    if path.suffix == ".gz":
        with (
            path.open("wb") as f,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=f, compresslevel=compresslevel, mtime=0
            ) as gz,
        ):
            gz.write(payload)
    else:
        path.write_bytes(payload)

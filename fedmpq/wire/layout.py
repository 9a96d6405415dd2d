"""A model's layout: the names and shapes of its tensors, in one canonical order.

Both ends of a run build the same model from ``model_name`` (and the data's classes
and input shape), so the layout never travels with the tensors.  A frame that carries
tensors carries them positionally, in layout order (tensor names sorted), together
with the layout's digest only.  A receiver decodes against the layout of the model it
built itself (``fedmpq.state.model_layout``) or one this process has encoded a message
of; only a global model written to a file carries the layout whole.

The layouts a process has encoded are remembered in a small bounded book, from which
the coordinator decodes the updates of the model it sends.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

#: Bytes of the SHA-256 a layout is named by on the wire (64 bits: collisions among
#: the handful of layouts a run uses are out of reach, and a frame pays 10 bytes).
DIGEST_BYTES = 8

#: Layouts a process remembers; the oldest is forgotten first.
MAX_KNOWN_LAYOUTS = 64


@dataclass(frozen=True)
class ModelLayout:
    """Tensor names and shapes in layout order (sorted by name).

    Attributes
    ----------
    names
        Distinct tensor names, sorted.
    shapes
        One shape per name.
    digest
        ``DIGEST_BYTES`` of the SHA-256 of the canonical msgpack of ``to_wire()``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if list(self.names) != sorted(set(self.names)):
            raise ValueError("layout names must be distinct and sorted")
        if len(self.shapes) != len(self.names):
            raise ValueError("a layout needs exactly one shape per name")
        packed = msgpack.packb(self.to_wire(), use_bin_type=True)
        object.__setattr__(self, "digest", hashlib.sha256(packed).digest()[:DIGEST_BYTES])

    @classmethod
    def of_entries(cls, entries: Iterable[tuple[str, Iterable[int]]]) -> ModelLayout:
        """The layout of ``(name, shape)`` pairs in any order.

        Raises
        ------
        ValueError
            If a name repeats.
        """
        by_name = {}
        for name, shape in entries:
            if name in by_name:
                raise ValueError(f"tensor name {name!r} appears twice")
            by_name[name] = tuple(int(d) for d in shape)
        names = tuple(sorted(by_name))
        return cls(names, tuple(by_name[n] for n in names))

    @classmethod
    def of_state(cls, state: Mapping[str, np.ndarray]) -> ModelLayout:
        """The layout of a numpy state dict (``fedmpq.state.state_to_numpy``)."""
        return cls.of_entries((name, np.shape(w)) for name, w in state.items())

    def to_wire(self) -> list[list[object]]:
        """``[[name, [dims...]], ...]`` in layout order: how a file carries it."""
        return [[name, list(shape)] for name, shape in zip(self.names, self.shapes, strict=True)]

    @property
    def hex(self) -> str:
        """The digest as hex, for messages and logs."""
        return self.digest.hex()


_known: OrderedDict[bytes, ModelLayout] = OrderedDict()


def remember_layout(layout: ModelLayout) -> None:
    """Make ``layout`` decodable by digest in this process (bounded, oldest forgotten)."""
    _known[layout.digest] = layout
    _known.move_to_end(layout.digest)
    while len(_known) > MAX_KNOWN_LAYOUTS:
        _known.popitem(last=False)


def known_layout(digest: bytes) -> ModelLayout | None:
    """The remembered layout with ``digest``, or None."""
    return _known.get(digest)

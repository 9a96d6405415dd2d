"""Facts about an exported model stored in its ONNX metadata, written by the coordinator
and read on the device (pure: no torch, no onnx)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

#: ``metadata_props`` key of the label names, a JSON list in label order.
CLASS_NAMES = "class_names"


def class_names_metadata(names: Sequence[str]) -> dict[str, str]:
    """The metadata entry carrying ``names`` (none when the data set has no names)."""
    return {CLASS_NAMES: json.dumps(list(names))} if names else {}


def read_class_names(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The label names in ``metadata``, or ``()`` if absent or not a JSON list of strings."""
    try:
        names = json.loads(metadata.get(CLASS_NAMES, "[]"))
    except ValueError:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return ()
    return tuple(names)

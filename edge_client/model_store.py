"""Where a device keeps the trained model it received, with the standard library only.

Layout of the model directory::

    <fingerprint>.onnx   the ONNX file, named by the SHA-256 of its bytes
    current.json         which file is current, plus its input shape, classes, ...

A new model is written to a temporary file, synced and renamed into place, and only
then does ``current.json`` (written the same way) point to it, so a crash or power
cut at any moment leaves the previous model or the new one, never a torn file.
Files of older models are removed after the switch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedmpq.errors import FedmpqError
from fedmpq.fileio import write_atomic
from fedmpq.wire.messages import ModelMessage

CURRENT = "current.json"


class ModelStoreError(FedmpqError):
    """A model that fails its fingerprint check, or a model directory without a model."""


@dataclass(frozen=True)
class StoredModel:
    """The current model of a model directory."""

    path: Path
    fingerprint: str
    run_id: str
    round: int
    model_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    pixel_scale: float
    bits: dict[str, int]


def default_model_dir() -> Path:
    """``$FEDMPQ_MODEL_DIR``, else ``$XDG_DATA_HOME/fedmpq`` (``~/.local/share/fedmpq``)."""
    explicit = os.environ.get("FEDMPQ_MODEL_DIR")
    if explicit:
        return Path(explicit)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fedmpq"


def sha256_hex(data: bytes) -> str:
    """The model fingerprint: SHA-256 of the ONNX bytes, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


class ModelStore:
    """The model directory of one device (created on first save)."""

    #: The ``ModelMessage`` fields :meth:`save` keeps next to the file.
    INFO_FIELDS = (
        "run_id",
        "round",
        "model_name",
        "input_shape",
        "num_classes",
        "pixel_scale",
        "bits",
    )

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save_message(self, msg: ModelMessage) -> StoredModel:
        """:meth:`save` the model a ``ModelMessage`` carries, with its description."""
        info = {k: getattr(msg, k) for k in self.INFO_FIELDS}
        return self.save(msg.onnx, msg.fingerprint, info)

    def save(self, onnx_bytes: bytes, fingerprint: str, info: dict[str, Any]) -> StoredModel:
        """Verify ``onnx_bytes`` against ``fingerprint`` and make it the current model.

        Parameters
        ----------
        onnx_bytes
            The ONNX file.
        fingerprint
            Its claimed SHA-256 hex digest.
        info
            ``run_id``, ``round``, ``model_name``, ``input_shape``, ``num_classes``,
            ``pixel_scale`` and ``bits`` of the model.

        Returns
        -------
        StoredModel

        Raises
        ------
        ModelStoreError
            If the bytes do not hash to ``fingerprint`` (nothing is written then).
        """
        actual = sha256_hex(onnx_bytes)
        if actual != fingerprint.lower():
            raise ModelStoreError(
                f"model fingerprint mismatch: message says {fingerprint}, bytes hash to {actual}"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{actual}.onnx"
        if not path.exists():
            write_atomic(path, onnx_bytes)
        stored = StoredModel(
            path=path,
            fingerprint=actual,
            run_id=str(info["run_id"]),
            round=int(info["round"]),
            model_name=str(info["model_name"]),
            input_shape=tuple(int(d) for d in info["input_shape"]),
            num_classes=int(info["num_classes"]),
            pixel_scale=float(info["pixel_scale"]),
            bits={str(k): int(v) for k, v in info["bits"].items()},
        )
        record = asdict(stored) | {"path": path.name}
        write_atomic(self.directory / CURRENT, json.dumps(record, indent=1).encode())
        for old in self.directory.glob("*.onnx"):
            if old != path:
                old.unlink(missing_ok=True)
        return stored

    def current(self) -> StoredModel:
        """The current model, re-verified against its fingerprint.

        Raises
        ------
        ModelStoreError
            If there is no model yet, or the file does not match its fingerprint.
        """
        try:
            record = json.loads((self.directory / CURRENT).read_text())
        except FileNotFoundError:
            raise ModelStoreError(
                f"no model in {self.directory}: the agent stores one when a run finishes "
                "(or pass --model PATH.onnx)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"cannot read {self.directory / CURRENT}: {exc}") from exc
        path = self.directory / Path(str(record["path"])).name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelStoreError(f"cannot read model file {path}: {exc}") from exc
        if sha256_hex(data) != record["fingerprint"]:
            raise ModelStoreError(f"{path} does not match its fingerprint: file is corrupt")
        return StoredModel(
            path=path,
            fingerprint=str(record["fingerprint"]),
            run_id=str(record["run_id"]),
            round=int(record["round"]),
            model_name=str(record["model_name"]),
            input_shape=tuple(int(d) for d in record["input_shape"]),
            num_classes=int(record["num_classes"]),
            pixel_scale=float(record["pixel_scale"]),
            bits={str(k): int(v) for k, v in record["bits"].items()},
        )

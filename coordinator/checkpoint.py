"""Atomic per-round checkpoints, so a coordinator killed at any point resumes.

A checkpoint is one msgpack file (never pickle) holding the round just completed,
the global model as its encoded ``GlobalModelMessage`` frame with its layout inline
(so the model after resume is byte-identical to the one checkpointed), the policy's
learned state, the device registry, the selection RNG state and the running totals.
It is written to a temporary file, fsynced and renamed over the old one: a crash
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from coordinator.registry import DeviceRecord
from fedmpq.errors import ConfigError, DecodeError
from fedmpq.fileio import write_atomic
from fedmpq.state import fingerprint
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import DeviceProfile, GlobalModelMessage
from fedmpq.wire.tensors import encode_state

CHECKPOINT_FILE = "checkpoint.msgpack"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    run_id: str
    round: int  # last completed round
    global_frame: bytes  # encoded GlobalModelMessage of the model after ``round``
    policy_state: dict[str, Any]
    devices: list[DeviceRecord]
    rng_state: tuple[Any, ...]
    cumulative_uplink_bytes: int
    rejected: dict[str, int]

    def global_model(self) -> GlobalModelMessage:
        return decode(self.global_frame, GlobalModelMessage)


def model_frame(run_id: str, round: int, model_name: str, state: Mapping[str, np.ndarray]) -> bytes:
    """The full-precision model after ``round`` as an encoded ``GlobalModelMessage``.

    The frame carries its layout whole (the link carries only its digest): resume, export
    and any other reader decode the file without building the model.
    """
    glob = GlobalModelMessage(
        run_id, round, model_name, fingerprint(state), encode_state(state, {})
    )
    return encode(glob, inline_layout=True)


def _device_to_wire(d: DeviceRecord) -> dict[str, Any]:
    return {
        "client_id": d.client_id,
        "profile": dataclasses.asdict(d.profile),
        "num_samples": d.num_samples,
        "accepts_zstd": d.accepts_zstd,
    }


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``out_dir/checkpoint.msgpack``."""
    version, state, gauss = ckpt.rng_state
    body = {
        "format": FORMAT_VERSION,
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "global_frame": ckpt.global_frame,
        "policy_state": ckpt.policy_state,
        "devices": [_device_to_wire(d) for d in ckpt.devices],
        "rng_state": [version, list(state), gauss],
        "cumulative_uplink_bytes": ckpt.cumulative_uplink_bytes,
        "rejected": dict(ckpt.rejected),
    }
    path = out_dir / CHECKPOINT_FILE
    write_atomic(path, msgpack.packb(body, use_bin_type=True))
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """Read the checkpoint in ``out_dir``; ConfigError saying what is wrong otherwise."""
    path = out_dir / CHECKPOINT_FILE
    try:
        body = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
    except OSError as exc:
        raise ConfigError(f"cannot resume: no readable checkpoint at {path}: {exc}") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise ConfigError(f"cannot resume: {path} is not a fedmpq checkpoint: {exc}") from exc
    try:
        if body["format"] != FORMAT_VERSION:
            raise ConfigError(f"{path}: checkpoint format {body['format']}, expected 1")
        version, state, gauss = body["rng_state"]
        ckpt = Checkpoint(
            run_id=body["run_id"],
            round=int(body["round"]),
            global_frame=bytes(body["global_frame"]),
            policy_state=dict(body["policy_state"]),
            devices=[
                DeviceRecord(
                    d["client_id"],
                    DeviceProfile(**d["profile"]),
                    int(d["num_samples"]),
                    bool(d["accepts_zstd"]),
                    online=False,  # until the device's retained status says otherwise
                )
                for d in body["devices"]
            ],
            rng_state=(version, tuple(state), gauss),
            cumulative_uplink_bytes=int(body["cumulative_uplink_bytes"]),
            rejected={str(k): int(v) for k, v in body["rejected"].items()},
        )
        ckpt.global_model()  # validates the model frame
    except (KeyError, TypeError, ValueError, DecodeError) as exc:
        raise ConfigError(f"cannot resume: {path} is damaged: {exc}") from exc
    return ckpt

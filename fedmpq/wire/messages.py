"""Every message that crosses MQTT, as a dataclass.

The wire codec (``fedmpq.wire.codec``) turns these into msgpack and back, and
validates every field on the way in: field names and types come from the
annotations here, so a field added here is a field the decoder checks.

Conventions
-----------
* ``bits`` is always the number of bits each element costs on the wire, sign
  included: 1..8 for quantized tensors, 16 or 32 for float pass-through.
* Tensors are row-major (C order); ``shape`` is a list of non-negative ints.
* Times are seconds (float); sizes are bytes (int).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedmpq.quant_spec import OBSERVER_MINMAX
from fedmpq.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyRoster,
    MaskedInput,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

#: ``UpdateMessage.kind`` values: what the tensors of an update are.
KIND_WEIGHTS = "weights"  # the client's local model (FedAvg, FedMPQ)
KIND_DELTA = "delta"  # local model minus the global model it started from (QSGD)
UPDATE_KINDS = frozenset({KIND_WEIGHTS, KIND_DELTA})


@dataclass
class TensorPayload:
    """One tensor, quantized and bit-packed (or float) as it travels.

    ``scale`` holds one little-endian float32 per tensor (``axis == -1``); with one
    scale per slice along ``axis``, a little-endian float32 reference and then one
    uint8 code per slice (``fedmpq.quant_scales``).  ``zero_point`` holds one uint8 per
    scale for the affine scheme and is empty otherwise.  ``data`` holds exactly
    ``ceil(prod(shape) * bits / 8)`` bytes.
    """

    name: str
    shape: list[int]
    bits: int
    scheme: str
    axis: int
    scale: bytes
    zero_point: bytes
    data: bytes


@dataclass
class DeviceProfile:
    """What a device measured about itself (``edge_client.profiling``) or was told to be
    (an emulated device's profile)."""

    total_ram: int
    available_ram: int
    cpu_count: int
    cpu_freq_mhz: float
    load_avg: float
    gflops: float
    platform: str
    arch: str
    battery_percent: float | None = None
    uplink_bps: float | None = None
    downlink_bps: float | None = None
    latency_s: float | None = None
    profile_name: str = ""  # device profile the device emulates; "" for real hardware


@dataclass
class RegisterMessage:
    """A device announces itself and its resources (device -> coordinator)."""

    MESSAGE_TYPE: ClassVar[str] = "register"

    client_id: str
    agent_version: str
    profile: DeviceProfile
    num_samples: int
    accepts_zstd: bool
    sent_at: float
    # What the device trains on (``fedmpq.state.fingerprint`` of its share); "" = not
    # reported.  Two devices with the same one train on the same data: the coordinator warns.
    data_fingerprint: str = ""


@dataclass
class TaskMessage:
    """One round's work for one client (coordinator -> device).

    The device starts from the ``GlobalModelMessage`` of fingerprint
    ``model_fingerprint`` at allocation ``model_allocation`` (``""``: all float32), one
    payload per distinct allocation (``fedmpq.wire.downlink``).  ``bits`` maps each
    quantizable layer name to its bit-width for this client and round, quantized with
    ``scheme`` (one scale per output channel when ``per_channel``).  ``options`` carries
    the policy's client-side settings (e.g. a regulariser strength), all numeric.  ``observer``
    says how symmetric scales are chosen, in training and in the update alike.
    ``token`` is random per task; the update echoes it, which shows (without device
    keys) that the update comes from whoever received the task.  ``secagg`` is set when
    the round aggregates securely: the device then answers with the secure-aggregation
    messages (:data:`SECAGG_UPLINK`) instead of an ``UpdateMessage``.
    """

    MESSAGE_TYPE: ClassVar[str] = "task"

    run_id: str
    round: int
    client_id: str
    model_name: str
    model_fingerprint: str
    policy: str
    bits: dict[str, int]
    scheme: str
    per_channel: bool
    epochs: int
    batch_size: int
    learning_rate: float
    deadline_s: float
    compress: bool
    options: dict[str, float] = field(default_factory=dict)
    observer: str = OBSERVER_MINMAX
    token: str = ""
    model_allocation: str = ""
    secagg: SecAggSetup | None = None


@dataclass
class GlobalModelMessage:
    """The global model at the start of a round (coordinator -> devices).

    ``fingerprint`` names the float global model (``fedmpq.state.fingerprint``).
    ``allocation`` is ``""`` when every tensor is float32; otherwise the model is
    quantized the way the devices of one allocation start training from it, and
    ``allocation`` is that allocation's key (``fedmpq.wire.downlink``).  On the wire
    this message also carries the model's layout (``fedmpq.wire.layout``).
    """

    MESSAGE_TYPE: ClassVar[str] = "global_model"

    run_id: str
    round: int
    model_name: str
    fingerprint: str
    tensors: list[TensorPayload]
    allocation: str = ""


@dataclass
class ResourceUsage:
    """What the round cost the device."""

    train_seconds: float
    peak_rss_bytes: int
    cpu_percent: float
    emulated_seconds: float = 0.0  # compute + transfer time the profiled device would take


@dataclass
class UpdateMessage:
    """A client's result for one round (device -> coordinator).

    ``bits_dropped`` reports, per layer, how many bit-planes local training removed
    (FedMPQ's delta); policies that do not prune send an empty map.  ``token`` is the
    task's.
    """

    MESSAGE_TYPE: ClassVar[str] = "update"

    run_id: str
    round: int
    client_id: str
    num_samples: int
    model_fingerprint: str
    kind: str
    tensors: list[TensorPayload]
    usage: ResourceUsage
    metrics: dict[str, float]
    bits_dropped: dict[str, int] = field(default_factory=dict)
    token: str = ""


#: ``StatusMessage.detail`` of the announcement a device makes on every (re)connect.
STATUS_CONNECTED = "connected"


@dataclass
class StatusMessage:
    """Liveness and state of a device (device -> coordinator, retained; also the
    device's MQTT last will, with ``state == "offline"``).

    On every (re)connect a device announces ``state == "online"`` with
    ``detail == STATUS_CONNECTED``: the coordinator then re-sends the task of an open
    round the device was selected for and has not answered, since a broker restart
    may have lost it.

    ``connection`` is a fresh random value per MQTT connection, the same in that
    connection's will and in every status sent over it: the coordinator ignores a status
    of an earlier connection (a replayed will), and a status it has not seen before
    cannot be made from a captured one when frames are signed.  "" = not reported.
    """

    MESSAGE_TYPE: ClassVar[str] = "status"

    client_id: str
    state: str  # "online" | "offline" | "training" | "rejected" | "error"
    round: int
    detail: str
    sent_at: float
    connection: str = ""


@dataclass
class ControlMessage:
    """Run-level announcements (coordinator -> all, retained).

    ``state`` is "open" while the run accepts devices, "finished" when it is over.
    Devices that see a ``run_id`` they have not registered with register again.
    """

    MESSAGE_TYPE: ClassVar[str] = "control"

    run_id: str
    state: str
    round: int
    detail: str
    sent_at: float


@dataclass
class ModelMessage:
    """The trained model, ready for inference on devices (coordinator -> all, retained).

    ``onnx`` is a mixed-precision ONNX file (``coordinator.export``) whose graph takes
    raw pixel values of shape ``(N, *input_shape)`` and applies the normalisation
    ``(x / pixel_scale - mean) / std`` itself; ``mean``/``std`` are informative.
    ``fingerprint`` is the SHA-256 (hex) of ``onnx``, which devices check before
    storing it.  ``bits`` is the bit-width each layer was exported at.
    """

    MESSAGE_TYPE: ClassVar[str] = "model"

    run_id: str
    round: int
    model_name: str
    fingerprint: str
    onnx: bytes
    input_shape: list[int]
    num_classes: int
    mean: list[float]
    std: list[float]
    pixel_scale: float
    bits: dict[str, int]


@dataclass
class NoticeMessage:
    """The coordinator tells a device it is left out of a round, and why (coordinator ->
    device, on its task topic), e.g. when its profile cannot fit even 1-bit training."""

    MESSAGE_TYPE: ClassVar[str] = "notice"

    run_id: str
    client_id: str
    round: int
    reason: str


#: Secure-aggregation steps (``fedmpq.secagg.messages``) a device sends on its update topic.
SECAGG_UPLINK = (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse)
#: Secure-aggregation steps the coordinator sends on a device's task topic.
SECAGG_DOWNLINK = (KeyRoster, ForwardedShares, UnmaskRequest)

#: Every top-level message type, by its wire name.
MESSAGE_TYPES: dict[str, type] = {
    cls.MESSAGE_TYPE: cls
    for cls in (
        RegisterMessage,
        TaskMessage,
        GlobalModelMessage,
        UpdateMessage,
        StatusMessage,
        ControlMessage,
        ModelMessage,
        NoticeMessage,
        *SECAGG_UPLINK,
        *SECAGG_DOWNLINK,
    )
}

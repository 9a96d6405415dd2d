"""Secure aggregation's cost next to the plain quantized round, at 10 devices.

Run from the repository root (it is CPU-heavy for a few seconds; be nice to neighbours)::

    nice python -m benchmarks.secagg              # 3 repeats
    nice python -m benchmarks.secagg --repeats 1

Two sections:

* **bits** -- uplink per weight and bytes per device for 4-bit updates from 10 devices:
  the plain quantized update (packed codes plus per-channel float32 scales), the masked
  update in the ``k``-bit ring (``k = 8`` here) plus the protocol's key and share messages,
  and Flower's SecAgg+ ring of 2**32 (computed: 32 bits per weight; its own key and share
  messages are not counted).  Byte counts are the messages' payload fields, not the
  msgpack framing, topic or signature every frame carries in both cases.
* **time** -- CPU seconds (``time.process_time``, so other load on the machine does not
  count; best of ``--repeats``) of every step, for the cnn (105k parameters) and
  resnet20 (271k), with no dropout and with ``n - t = 4`` devices dropping before they
  send (the most unmasking work).  The plain round's device encode (quantize + pack) and
  coordinator aggregate (unpack + de-quantize + weighted sum) are measured in the same run,
  so the ratios hold on any machine.  The critical path counts one device (devices work in
  parallel) plus the coordinator; training, which dominates a real round, is not included.

Every tensor of the model state goes through the grid (an unmasked float tensor would
leak), each at 4 bits with the global tensor's ``max|w|`` as its scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from coordinator.aggregation import StreamingAverage
from fedmpq.models import build_model
from fedmpq.packing import pack_bits, packed_nbytes, unpack_bits
from fedmpq.quant import QuantizedTensor, dequantize, quantize
from fedmpq.secagg import (
    Dropouts,
    LayerGrid,
    SecAggSetup,
    default_threshold,
    grid_codes,
    ring_bits,
    simulate_round,
)
from fedmpq.secagg.crypto import KEY_BYTES
from fedmpq.secagg.device import SHARE_CIPHERTEXT_BYTES
from fedmpq.secagg.ring import ring_nbytes
from fedmpq.secagg.shamir import SHARE_BYTES
from fedmpq.state import state_to_numpy

DEVICES = 10
BITS = 4
FLOWER_RING_BITS = 32
MODELS = {"cnn": (1, 28, 28), "resnet20": (3, 32, 32)}
T = TypeVar("T")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "secagg.json"


def global_state(model: str) -> dict[str, np.ndarray]:
    return state_to_numpy(build_model(model, num_classes=10, in_shape=MODELS[model]))


def local_states(state: Mapping[str, np.ndarray], seed: int) -> list[dict[str, np.ndarray]]:
    """What ten devices send back: the global weights moved a little by 'training'."""
    rng = np.random.default_rng(seed)
    return [
        {
            name: w + np.float32(0.01) * rng.standard_normal(w.shape, dtype=np.float32)
            for name, w in state.items()
        }
        for _ in range(DEVICES)
    ]


def round_setup(state: Mapping[str, np.ndarray]) -> SecAggSetup:
    layers = [
        LayerGrid(name, int(w.size), BITS, float(np.abs(w).max()) or 1.0)
        for name, w in state.items()
    ]
    ids = [f"device-{i:02d}" for i in range(DEVICES)]
    return SecAggSetup("bench", 1, ids, default_threshold(DEVICES), layers)


def _axis(w: np.ndarray) -> int:
    return 0 if w.ndim >= 2 else -1


# -- bits ---------------------------------------------------------------------------------


def bits_section(model: str) -> dict[str, Any]:
    """Uplink and downlink bytes per device, from the protocol's field sizes."""
    state = global_state(model)
    setup = round_setup(state)
    weights = sum(int(w.size) for w in state.values())
    scales = sum(1 if _axis(w) == -1 else w.shape[0] for w in state.values())
    plain = sum(packed_nbytes(int(w.size), BITS) for w in state.values()) + 4 * scales
    k = ring_bits(BITS, DEVICES)
    masked = sum(ring_nbytes(g.size, k) for g in setup.layers)
    n = DEVICES
    protocol_up = 2 * KEY_BYTES + (n - 1) * SHARE_CIPHERTEXT_BYTES + n * SHARE_BYTES
    protocol_down = n * 2 * KEY_BYTES + (n - 1) * SHARE_CIPHERTEXT_BYTES
    flower = weights * FLOWER_RING_BITS // 8
    rows: dict[str, dict[str, float]] = {
        "plain_quantized": {"bits_per_weight": 8 * plain / weights, "uplink_bytes": plain},
        "secagg_ring": {
            "ring_bits": k,
            "bits_per_weight": 8 * masked / weights,
            "masked_update_bytes": masked,
            "protocol_uplink_bytes": protocol_up,
            "uplink_bytes": masked + protocol_up,
            "protocol_downlink_bytes": protocol_down,
        },
        "flower_secaggplus_ring": {"bits_per_weight": FLOWER_RING_BITS, "uplink_bytes": flower},
    }
    print(f"\n{model}: {weights:,} weights, {BITS}-bit updates from {n} devices")
    print(f"{'':26}{'bits/weight':>12}{'uplink bytes/device':>22}")
    for label, row in (
        ("plain quantized", rows["plain_quantized"]),
        (f"secure, {k}-bit ring", rows["secagg_ring"]),
        ("Flower SecAgg+ (2^32)", rows["flower_secaggplus_ring"]),
    ):
        print(f"{label:26}{row['bits_per_weight']:>12.2f}{row['uplink_bytes']:>22,}")
    print(
        f"  secure = {masked:,} masked + {protocol_up:,} keys/shares; downlink adds "
        f"{protocol_down:,} bytes of keys and shares; Flower / secure uplink = "
        f"{flower / (masked + protocol_up):.2f}x"
    )
    return {"weights": weights, "devices": n, "bits": BITS, **rows}


# -- time ---------------------------------------------------------------------------------


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and the CPU seconds it took."""
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def plain_encode(update: Mapping[str, np.ndarray]) -> list[tuple[bytes, QuantizedTensor]]:
    out = []
    for w in update.values():
        q = quantize(w, BITS, axis=_axis(w))
        out.append((pack_bits(q.codes, BITS), q))
    return out


def plain_aggregate(
    state: Mapping[str, np.ndarray], encoded: list[list[tuple[bytes, QuantizedTensor]]]
) -> dict[str, np.ndarray]:
    agg = StreamingAverage(state)
    for device in encoded:
        tensors = {}
        for (name, w), (data, q) in zip(state.items(), device, strict=True):
            codes = unpack_bits(data, BITS, int(w.size)).reshape(w.shape)
            tensors[name] = dequantize(
                QuantizedTensor(codes, BITS, q.scheme, q.axis, q.scale, q.zero_point)
            )
        agg.add(tensors, 1.0)
    return agg.mean()


def on_grid(update: Mapping[str, np.ndarray], scales: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {name: grid_codes(w, scales[name], BITS) for name, w in update.items()}


def time_section(model: str, repeats: int) -> dict[str, Any]:
    state = global_state(model)
    updates = local_states(state, seed=1)
    setup = round_setup(state)
    bits = {cid: {g.name: BITS for g in setup.layers} for cid in setup.client_ids}
    scales = {g.name: g.scale for g in setup.layers}
    dropouts = {
        "none": Dropouts(),
        "n-t before sending": Dropouts(
            before_sending=frozenset(setup.client_ids[: DEVICES - setup.threshold])
        ),
    }
    best: dict[str, float] = {}

    def keep(step: str, seconds: float) -> None:
        best[step] = min(best.get(step, float("inf")), seconds)

    for _ in range(repeats):
        encoded = []
        for update in updates:
            device, seconds = timed(plain_encode, update)
            keep("plain_device_encode", seconds)
            encoded.append(device)
        keep("plain_coordinator_aggregate", timed(plain_aggregate, state, encoded)[1])

        codes = {}
        for cid, update in zip(setup.client_ids, updates, strict=True):
            codes[cid], seconds = timed(on_grid, update, scales)
            keep("secure_device_grid", seconds)
        for label, drop in dropouts.items():
            steps: dict[str, float] = {}
            result = simulate_round(setup, codes, bits, drop, cpu_seconds=steps)
            keep(f"{label}|coordinator_dequantize", timed(result.dequantized, setup)[1])
            # device steps are summed over the devices that took them: report one device's
            answered = len(result.contributors) - len(drop.after_sending)
            takers = {
                "device_keys": DEVICES,
                "device_shares": DEVICES - len(drop.before_sharing),
                "device_mask": len(result.contributors),
                "device_unmask": answered,
            }
            for step, seconds in steps.items():
                keep(f"{label}|{step}", seconds / takers.get(step, 1))
    return _time_report(model, best, dropouts)


def _time_report(
    model: str, best: dict[str, float], dropouts: Mapping[str, Dropouts]
) -> dict[str, Any]:
    plain_device = best["plain_device_encode"]
    plain_coord = best["plain_coordinator_aggregate"]
    report: dict[str, Any] = {
        "plain": {
            "device_encode_ms": plain_device * 1e3,
            "coordinator_aggregate_ms": plain_coord * 1e3,
        },
        "secure_device_grid_ms": best["secure_device_grid"] * 1e3,
    }
    print(f"\n{model}: CPU ms, {DEVICES} devices, {BITS} bits (best of repeats)")
    print(
        f"  plain: device encode {plain_device * 1e3:.1f}, "
        f"coordinator aggregate {plain_coord * 1e3:.1f}"
    )
    for label in dropouts:
        step = {k.split("|", 1)[1]: v for k, v in best.items() if k.startswith(label + "|")}
        device = best["secure_device_grid"] + sum(
            v for k, v in step.items() if k.startswith("device_")
        )
        coord = sum(v for k, v in step.items() if k.startswith("coordinator_"))
        path_secure, path_plain = device + coord, plain_device + plain_coord
        report[label] = {
            "steps_ms": {k: v * 1e3 for k, v in sorted(step.items())},
            "device_ms": device * 1e3,
            "coordinator_ms": coord * 1e3,
            "device_vs_plain": device / plain_device,
            "coordinator_vs_plain": coord / plain_coord,
            "critical_path_ms": path_secure * 1e3,
            "plain_critical_path_ms": path_plain * 1e3,
            "critical_path_vs_plain": path_secure / path_plain,
        }
        print(f"  secure, dropouts {label}:")
        print(
            "    device: grid {:.1f} + keys {:.1f} + shares {:.1f} + mask {:.1f} + unmask {:.1f}"
            " = {:.1f} ({:.2f}x plain encode)".format(
                best["secure_device_grid"] * 1e3,
                *(step.get(f"device_{s}", 0.0) * 1e3 for s in ("keys", "shares", "mask", "unmask")),
                device * 1e3,
                device / plain_device,
            )
        )
        print(
            "    coordinator: keys {:.1f} + shares {:.1f} + sum {:.1f} + unmask {:.1f}"
            " + dequantize {:.1f} = {:.1f} ({:.2f}x plain aggregate)".format(
                *(
                    step.get(f"coordinator_{s}", 0.0) * 1e3
                    for s in ("keys", "shares", "sum", "unmask", "dequantize")
                ),
                coord * 1e3,
                coord / plain_coord,
            )
        )
        print(
            f"    critical path (one device + coordinator): {path_secure * 1e3:.1f} ms vs "
            f"{path_plain * 1e3:.1f} ms plain ({path_secure / path_plain:.2f}x)"
        )
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "environment": {
            "repeats": args.repeats,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "bits": {model: bits_section(model) for model in MODELS},
        "cpu_time": {model: time_section(model, args.repeats) for model in MODELS},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()

"""Codec speed: n-bit packing and unpacking relative to a memory copy, and whole-model
updates (every model of the registry) through quantize + pack + frame and back, with
their size against the ideal.

Run from the repository root::

    python -m benchmarks.codec            # 10M elements
    python -m benchmarks.codec --quick    # 1M elements

Speeds are quoted as float32-input bytes per second (``4 * count`` bytes over
the time taken) relative to ``np.copy`` of a float32 array of the same count,
measured in the same run, because the absolute numbers depend on the machine
and on whatever else it is doing.  A ratio of 1.0 means "as fast as memcpy".

Each section is one function that measures, prints its table and returns a
JSON-able result; :func:`main` runs them in order and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmpq.models import build_model, quantizable_layers
from fedmpq.packing import pack_bits, unpack_bits
from fedmpq.quant import dequantize, quantize
from fedmpq.state import fingerprint, state_to_numpy
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.downlink import global_model_at
from fedmpq.wire.messages import KIND_WEIGHTS, ResourceUsage, UpdateMessage
from fedmpq.wire.tensors import decode_state, encode_state, ideal_nbytes

FULL_COUNT = 10_000_000
QUICK_COUNT = 1_000_000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "codec.json"
NAIVE_BITS = 4


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_codes(count: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=count, dtype=np.uint8)


def copy_reference(count: int, repeats: int) -> dict[str, float]:
    """Time ``np.copy`` of ``count`` float32 values: the yardstick for every ratio."""
    weights = np.random.default_rng(0).standard_normal(count, dtype=np.float32)
    seconds = best_seconds(lambda: np.copy(weights), repeats)
    print(f"np.copy of {count:,} float32: {seconds * 1e3:.2f} ms")
    return {"copy_ms": seconds * 1e3}


def _row(bits: int, pack_s: float, unpack_s: float, copy_ms: float) -> dict[str, float]:
    return {
        "bits": bits,
        "pack_ms": pack_s * 1e3,
        "unpack_ms": unpack_s * 1e3,
        "pack_vs_copy": copy_ms / (pack_s * 1e3),
        "unpack_vs_copy": copy_ms / (unpack_s * 1e3),
    }


def _print_rows(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'n':>2} {'pack ms':>9} {'unpack ms':>10} {'pack/copy':>10} {'unpack/copy':>12}")
    for row in rows:
        print(
            f"{row['bits']:>2} {row['pack_ms']:>9.2f} {row['unpack_ms']:>10.2f} "
            f"{row['pack_vs_copy']:>10.2f} {row['unpack_vs_copy']:>12.2f}"
        )


def packing_section(count: int, repeats: int, copy_ms: float) -> list[dict[str, float]]:
    """``pack_bits`` / ``unpack_bits`` for every n in 1..8."""
    rows = []
    for bits in range(1, 9):
        codes = random_codes(count, bits, seed=bits)
        packed = pack_bits(codes, bits)
        if not np.array_equal(unpack_bits(packed, bits, count), codes):
            raise AssertionError(f"{bits}-bit round trip failed")
        pack_s = best_seconds(partial(pack_bits, codes, bits), repeats)
        unpack_s = best_seconds(partial(unpack_bits, packed, bits, count), repeats)
        rows.append(_row(bits, pack_s, unpack_s, copy_ms))
    _print_rows("fedmpq.packing (check=True)", rows)
    return rows


def _naive_pack(codes: np.ndarray, bits: int) -> bytes:
    # One byte per bit, then np.packbits: simple, and the speed baseline.
    stream = np.unpackbits(codes[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(stream, bitorder="little").tobytes()


def _naive_unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    stream = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(count)


def naive_section(count: int, repeats: int, copy_ms: float) -> dict[str, float]:
    """The np.unpackbits/np.packbits route at n=4, as a reference for the gain."""
    codes = random_codes(count, NAIVE_BITS, seed=NAIVE_BITS)
    packed = _naive_pack(codes, NAIVE_BITS)
    # Same bytes as fedmpq.packing, so the two rows compare like with like.
    if packed != pack_bits(codes, NAIVE_BITS) or not np.array_equal(
        _naive_unpack(packed, NAIVE_BITS, count), codes
    ):
        raise AssertionError("naive route disagrees with fedmpq.packing")
    pack_s = best_seconds(lambda: _naive_pack(codes, NAIVE_BITS), repeats)
    unpack_s = best_seconds(lambda: _naive_unpack(packed, NAIVE_BITS, count), repeats)
    row = _row(NAIVE_BITS, pack_s, unpack_s, copy_ms)
    _print_rows("naive np.unpackbits/np.packbits (reference)", [row])
    return row


MODEL_BITS = (2, 4, 8)
#: Every model of the registry, with the input it is built for.
MODELS = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "resnet20": (3, 32, 32), "resnet18": (3, 32, 32)}
#: The compact-wire target: a frame is at most 1% + 1 KiB over the ideal size.
OVER_IDEAL_FRACTION = 0.01
OVER_IDEAL_BYTES = 1024


def _update_for(state: dict[str, np.ndarray], bits: dict[str, int], fp: str) -> UpdateMessage:
    return UpdateMessage(
        run_id="bench",
        round=1,
        client_id="device-0000",
        num_samples=1000,
        model_fingerprint=fp,  # the global model's: the device receives it with its task
        kind=KIND_WEIGHTS,
        tensors=encode_state(state, bits),
        usage=ResourceUsage(train_seconds=1.0, peak_rss_bytes=1, cpu_percent=0.0),
        metrics={"loss": 0.5, "accuracy": 0.9},
    )


def _decode_update(payload: bytes) -> dict[str, np.ndarray]:
    return decode_state(decode(payload, UpdateMessage).tensors)


def _scale_bytes(payload: bytes) -> int:
    return sum(len(t.scale) + len(t.zero_point) for t in decode(payload, UpdateMessage).tensors)


def _model_row(
    name: str, state: dict[str, np.ndarray], layers: list[str], bits: int, repeats: int
) -> dict[str, Any]:
    assignment = dict.fromkeys(layers, bits)
    fp = fingerprint(state)
    ideal = ideal_nbytes(state, assignment)
    weights = np.concatenate([w.reshape(-1) for w in state.values()])
    copy_s = best_seconds(partial(np.copy, weights), repeats)

    def encode_once() -> bytes:
        return encode(_update_for(state, assignment, fp))

    payload = encode_once()
    if not all(
        np.array_equal(v, dequantize_like(state[k], assignment.get(k)))
        for k, v in _decode_update(payload).items()
    ):
        raise AssertionError(f"{name} at {bits} bits does not round-trip")
    downlink = encode(
        global_model_at(state, assignment, run_id="bench", round=1, model_name=name, fingerprint=fp)
    )
    encode_s = best_seconds(encode_once, repeats)
    decode_s = best_seconds(partial(_decode_update, payload), repeats)
    scales = _scale_bytes(payload)
    allowed = ideal * OVER_IDEAL_FRACTION + OVER_IDEAL_BYTES
    return {
        "model": name,
        "params": int(weights.size),
        "tensors": len(state),
        "bits": bits,
        "copy_ms": copy_s * 1e3,
        "encode_ms": encode_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "encode_vs_copy": copy_s / encode_s,
        "decode_vs_copy": copy_s / decode_s,
        "payload_bytes": len(payload),
        "ideal_bytes": int(ideal),
        "over_ideal_bytes": len(payload) - int(ideal),
        "over_ideal_pct": 100 * (len(payload) / ideal - 1),
        "scale_bytes": scales,
        "allowed_over_bytes": int(allowed),
        "within_target": len(payload) - ideal <= allowed,
        "within_target_besides_scales": len(payload) - scales - ideal <= allowed,
        "float32_over_payload": weights.nbytes / len(payload),
        # The global model at the same bits, as its devices receive it (layout by digest).
        "downlink_bytes": len(downlink),
        "downlink_over_ideal_bytes": len(downlink) - int(ideal),
        "downlink_within_target": len(downlink) - ideal <= allowed,
    }


def dequantize_like(w: np.ndarray, bits: int | None) -> np.ndarray:
    """What the receiver must get back for ``w`` sent at ``bits`` (None: float32)."""
    if bits is None:
        return w
    axis = 0 if w.ndim >= 2 else -1
    return dequantize(quantize(w, bits, axis=axis))


def model_section(repeats: int) -> list[dict[str, Any]]:
    """Whole-model update: quantize+pack+frame and decode+unpack+de-quantize, and sizes.

    Speeds are relative to ``np.copy`` of the same model's float32 weights, timed next to
    them; sizes against the ideal ``sum n_l * b_l / 8`` (+ 4 bytes per float value), for the
    update (uplink) and for the global model at the same bits (downlink; both name the
    model's layout by its digest).
    """
    rows = []
    for name, in_shape in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, 10, in_shape)
        state = state_to_numpy(model)
        layers = quantizable_layers(model)
        rows += [_model_row(name, state, layers, bits, repeats) for bits in MODEL_BITS]
    print("\nwhole-model update (quantize+pack+frame / decode+unpack+de-quantize), per-channel")
    print(
        f"{'model':<9} {'params':>9} {'bits':>4} {'enc ms':>7} {'dec ms':>7} {'enc/copy':>8} "
        f"{'dec/copy':>8} {'payload B':>10} {'ideal B':>10} {'over B':>7} {'scales B':>8} "
        f"{'allowed':>7} {'ok':>3} {'down B':>10} {'over B':>7} {'ok':>3}"
    )
    for r in rows:
        print(
            f"{r['model']:<9} {r['params']:>9} {r['bits']:>4} {r['encode_ms']:>7.1f} "
            f"{r['decode_ms']:>7.1f} {r['encode_vs_copy']:>8.3f} {r['decode_vs_copy']:>8.3f} "
            f"{r['payload_bytes']:>10} {r['ideal_bytes']:>10} {r['over_ideal_bytes']:>7} "
            f"{r['scale_bytes']:>8} {r['allowed_over_bytes']:>7} "
            f"{'yes' if r['within_target'] else 'no':>3} {r['downlink_bytes']:>10} "
            f"{r['downlink_over_ideal_bytes']:>7} "
            f"{'yes' if r['downlink_within_target'] else 'no':>3}"
        )
    return rows


def environment(count: int, repeats: int) -> dict[str, Any]:
    return {
        "count": count,
        "repeats": repeats,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="n-bit packing speed relative to np.copy")
    parser.add_argument(
        "--quick", action="store_true", help=f"use {QUICK_COUNT:,} elements, not {FULL_COUNT:,}"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (best kept)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    count = QUICK_COUNT if args.quick else FULL_COUNT
    results: dict[str, Any] = {"environment": environment(count, args.repeats)}
    results["reference"] = copy_reference(count, args.repeats)
    copy_ms = results["reference"]["copy_ms"]
    results["packing"] = packing_section(count, args.repeats, copy_ms)
    results["naive_packbits"] = naive_section(count, args.repeats, copy_ms)
    results["whole_model"] = model_section(max(1, args.repeats // 2))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()

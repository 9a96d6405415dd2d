"""Fuzz the strict wire decoder: only ``DecodeError`` may ever come out.

Run from the repository root::

    python -m benchmarks.fuzz_decoders                 # 100,000 cases
    python -m benchmarks.fuzz_decoders --quick         # 5,000 cases
    python -m benchmarks.fuzz_decoders --cases 1000000 --seed 7

Every case takes a valid frame of some message type (tensors built by
``fedmpq.wire.tensors.encode_tensor``, positional against a model layout named by
digest, or carried whole as a global model in a file; plain or zstd) and breaks it:
random bytes, truncation, byte flips/insertions/deletions/splices of the frame or
of its body, wrong-typed/missing/extra fields, wrong frame keys, out-of-range
numbers, zstd bombs, oversized msgpack headers and deep nesting.  A fifth of the
cases decode under tight ``DecodeLimits`` so the limit checks are hit cheaply.

A case passes when ``decode`` raises ``DecodeError`` with a message, or returns a
message that survives ``encode``/``decode`` unchanged.  Anything else is a failure;
the script exits non-zero if there is one.  Speed is quoted relative to decoding
the unmutated frames and to a bare ``msgpack.unpackb`` of them, both measured in
the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from benchmarks.secagg_samples import random_setup, secagg_messages
from fedmpq import PROTOCOL_VERSION
from fedmpq.errors import DecodeError
from fedmpq.wire.codec import DEFAULT_LIMITS, DecodeLimits, Message, body_bytes, decode, encode
from fedmpq.wire.messages import (
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    RegisterMessage,
    ResourceUsage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.tensors import encode_tensor

FULL_CASES = 100_000
QUICK_CASES = 5_000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fuzz_decoders.json"
TIGHT_LIMITS = DecodeLimits(
    max_message_bytes=4096,
    max_elements=64,
    max_total_elements=96,
    max_tensors=4,
    max_string_len=16,
    max_map_entries=12,
    max_decompressed_bytes=4096,
)
TIGHT_SHARE = 0.2
COUNTS = ("cases", "accepted", "rejected", "other")
MAX_FAILURES_KEPT = 20

Rng = np.random.Generator
Sample = tuple[Message, bytes]  # a valid message and one of its frames


# --------------------------------------------------------------------------- valid frames


def _pick(rng: Rng, options: list[Any]) -> Any:
    """A uniform choice that keeps Python types (``rng.choice`` would make numpy scalars)."""
    return options[int(rng.integers(0, len(options)))]


def _text(rng: Rng, longest: int = 12) -> str:
    alphabet = "abcxyz_.0123-é中🙂"
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(0, longest + 1))))


def _tensors(rng: Rng) -> list[Any]:
    out = []
    for i in range(int(rng.integers(0, 4))):
        shape = tuple(int(d) for d in rng.integers(0, 7, size=int(rng.integers(0, 4))))
        bits = int(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16, 32]))
        scheme = str(rng.choice(["symmetric", "affine"]))
        w = rng.standard_normal(shape).astype(np.float32)
        out.append(encode_tensor(f"layer{i}.weight", w, bits, scheme, per_channel=bool(i % 2)))
    return out


def _messages(rng: Rng) -> list[Message]:
    """One valid message of every type, with random contents."""
    t = float(rng.uniform(0, 2e9))
    profile = DeviceProfile(
        total_ram=int(rng.integers(0, 2**40)),
        available_ram=int(rng.integers(0, 2**40)),
        cpu_count=int(rng.integers(1, 64)),
        cpu_freq_mhz=float(rng.uniform(0, 5000)),
        load_avg=float(rng.uniform(0, 8)),
        gflops=float(rng.uniform(0, 100)),
        platform=_text(rng),
        arch=_text(rng),
        battery_percent=None if rng.random() < 0.5 else float(rng.uniform(0, 100)),
        uplink_bps=float(rng.uniform(0, 1e9)),
        latency_s=float(rng.uniform(0, 1)),
        profile_name=_text(rng),
    )
    layers = {_text(rng): int(rng.choice([1, 2, 4, 8, 16, 32])) for _ in range(3)}
    return [
        RegisterMessage(_text(rng), "0.1.0", profile, int(rng.integers(0, 10**6)), True, t),
        TaskMessage(
            run_id=_text(rng),
            round=int(rng.integers(0, 1000)),
            client_id=_text(rng),
            model_name="cnn",
            model_fingerprint=_text(rng),
            policy="fedmpq",
            bits=layers,
            scheme="affine",
            per_channel=False,
            epochs=1,
            batch_size=32,
            learning_rate=float(rng.uniform(0, 1)),
            deadline_s=60.0,
            compress=True,
            options={"mu": float(rng.uniform(0, 1))},
            secagg=random_setup(rng, _text) if rng.random() < 0.5 else None,
        ),
        GlobalModelMessage(
            _text(rng), int(rng.integers(0, 1000)), "cnn", _text(rng), _tensors(rng)
        ),
        UpdateMessage(
            run_id=_text(rng),
            round=int(rng.integers(0, 1000)),
            client_id=_text(rng),
            num_samples=int(rng.integers(0, 10**5)),
            model_fingerprint=_text(rng),
            kind=str(rng.choice(["weights", "delta"])),
            tensors=_tensors(rng),
            usage=ResourceUsage(float(rng.uniform(0, 100)), int(rng.integers(0, 2**32)), 99.0),
            metrics={"loss": float(rng.uniform(0, 5)), "acc": float(rng.uniform(0, 1))},
            bits_dropped={k: int(rng.integers(0, 4)) for k in layers},
        ),
        StatusMessage(_text(rng), "training", int(rng.integers(-1, 1000)), _text(rng), t),
        ControlMessage(_text(rng), "open", int(rng.integers(0, 1000)), _text(rng), t),
        *secagg_messages(rng, _text),
    ]


def build_samples(rng: Rng, variants: int) -> list[Sample]:
    samples = []
    for _ in range(variants):
        for msg in _messages(rng):
            samples += [(msg, encode(msg)), (msg, encode(msg, compress=True, sig=b"sig"))]
    return samples


# --------------------------------------------------------------------------- mutations


def _frame(body: bytes, type_: str, codec: str = "none", **keys: Any) -> bytes:
    frame = {"v": PROTOCOL_VERSION, "type": type_, "codec": codec, "body": body, "sig": b"", **keys}
    return msgpack.packb(frame, use_bin_type=True)


def _edit(rng: Rng, data: bytes) -> bytes:
    """A few random byte flips, insertions and deletions."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = rng.integers(0, 3)
        i = int(rng.integers(0, len(buf) + 1))
        if op == 0:
            buf[i:i] = rng.bytes(int(rng.integers(1, 4)))
        elif buf:
            i %= len(buf)
            if op == 1:
                buf[i] ^= int(rng.integers(1, 256))
            else:
                del buf[i : i + int(rng.integers(1, 4))]
    return bytes(buf)


def _value(rng: Rng, depth: int = 0) -> Any:
    """A random msgpack-able value, biased to edge cases."""
    kind = int(rng.integers(0, 11 if depth < 2 else 9))
    specials = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 9, 16, 33]
    floats = [float("nan"), float("inf"), -float("inf"), -0.0, 1e308, 0.5]
    return [
        lambda: None,
        lambda: bool(rng.integers(0, 2)),
        lambda: _pick(rng, specials),
        lambda: int(rng.integers(-1000, 1000)),
        lambda: _pick(rng, floats),
        lambda: float(rng.standard_normal()),
        lambda: _text(rng, longest=int(rng.choice([4, 300]))),
        lambda: rng.bytes(int(rng.integers(0, 40))),
        lambda: "symmetric" if rng.random() < 0.5 else "float",
        lambda: [_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))],
        lambda: {_text(rng, 4): _value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))},
    ][kind]()


def _positions(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not isinstance(tree, (dict, list)):
        return [prefix]
    out = [prefix] if prefix else []
    for k in tree.keys() if isinstance(tree, dict) else range(len(tree)):
        out += _positions(tree[k], (*prefix, k))
    return out


def _tree_edit(rng: Rng, sample: Sample, action: str) -> bytes:
    """Replace, delete or add a field somewhere in the body map, then re-frame it."""
    msg, _ = sample
    body = msgpack.unpackb(body_bytes(msg))
    options = _positions(body)
    *parents, last = options[int(rng.integers(0, len(options)))]
    node = body
    for key in parents:
        node = node[key]
    if action == "replace":
        node[last] = _value(rng)
    elif action == "delete":
        del node[last]
    else:
        target = node[last] if isinstance(node[last], dict) else node
        if isinstance(target, dict):
            target[_text(rng, 6)] = _value(rng)
        else:
            target.append(_value(rng))
    return _frame(msgpack.packb(body, use_bin_type=True), msg.MESSAGE_TYPE)


def _frame_keys(rng: Rng, sample: Sample) -> bytes:
    keys = msgpack.unpackb(sample[1])
    key = str(rng.choice(["v", "type", "codec", "body", "sig", "extra"]))
    if rng.random() < 0.3 and key in keys:
        del keys[key]
    else:
        keys[key] = _value(rng) if rng.random() < 0.7 else _pick(rng, [0, 1, 3, "gzip", "hello"])
    return msgpack.packb(keys, use_bin_type=True)


def _zstd(size: int, *, with_size: bool) -> bytes:
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(write_content_size=with_size)
    with cctx.stream_writer(out, size=size if with_size else -1, closefd=False) as w:
        for start in range(0, size, 2**20):
            w.write(bytes(min(2**20, size - start)))
    return out.getvalue()


BOMBS = [
    _zstd(DEFAULT_LIMITS.max_decompressed_bytes + 1, with_size=True),
    _zstd(TIGHT_LIMITS.max_decompressed_bytes + 1, with_size=True),
    _zstd(TIGHT_LIMITS.max_decompressed_bytes * 4, with_size=False),
]
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",  # array32
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
]


def _bomb(rng: Rng, sample: Sample) -> bytes:
    type_ = sample[0].MESSAGE_TYPE
    if rng.random() < 0.5:
        return _frame(BOMBS[int(rng.integers(0, len(BOMBS)))], type_, "zstd")
    header = HUGE_HEADERS[int(rng.integers(0, len(HUGE_HEADERS)))] + rng.bytes(8)
    return header if rng.random() < 0.3 else _frame(header, type_)


def _deep(rng: Rng, sample: Sample) -> bytes:
    depth = int(rng.choice([10, 100, 1000, 100_000]))
    nested = (b"\x91" if rng.random() < 0.5 else b"\x81\xa1k") * depth + b"\xc0"
    where = rng.integers(0, 3)
    if where == 0:
        return nested
    if where == 1:
        return _frame(nested, sample[0].MESSAGE_TYPE)
    body = msgpack.unpackb(body_bytes(sample[0]))
    key = list(body)[int(rng.integers(0, len(body)))]
    raw = msgpack.packb({k: v for k, v in body.items() if k != key}, use_bin_type=True)
    # Splice the nested value in as one more entry: bump the fixmap count, append key + value.
    spliced = bytes([raw[0] + 1]) + raw[1:] + msgpack.packb(key) + nested
    return _frame(spliced, sample[0].MESSAGE_TYPE)


def _body_edit(rng: Rng, sample: Sample) -> bytes:
    """Byte-level damage inside the body, re-framed so the outer frame stays valid."""
    msg, frame = sample
    keys = msgpack.unpackb(frame)
    return _frame(_edit(rng, keys["body"]), msg.MESSAGE_TYPE, keys["codec"])


def _layout_edit(rng: Rng, sample: Sample) -> bytes:
    """Tensors that disagree with their layout: a digest nobody knows, a layout entry
    changed (a global model's layout whole, as files hold it), tensors dropped, repeated
    or reordered."""
    msg, _ = sample
    body = msgpack.unpackb(body_bytes(msg, inline_layout=isinstance(msg, GlobalModelMessage)))
    if "layout" not in body:
        return _tree_edit(rng, sample, "replace")
    layout, tensors = body["layout"], body["tensors"]
    action = int(rng.integers(0, 4))
    if action == 0:
        body["layout"] = rng.bytes(int(_pick(rng, [8, 8, 4, 0])))
    elif action == 1 and isinstance(layout, list) and layout:
        entry = layout[int(rng.integers(0, len(layout)))]
        entry[int(rng.integers(0, 2))] = _value(rng)
    elif action == 2 and tensors:
        del tensors[int(rng.integers(0, len(tensors)))]
    else:
        tensors.reverse()
        tensors.append(tensors[0] if tensors else [32, b""])
    return _frame(msgpack.packb(body, use_bin_type=True), msg.MESSAGE_TYPE)


def _splice(rng: Rng, sample: Sample, pool: list[Sample]) -> bytes:
    """The head of one valid frame glued to the tail of another."""
    other = pool[int(rng.integers(0, len(pool)))][1]
    head = sample[1][: int(rng.integers(0, len(sample[1])))]
    return head + other[int(rng.integers(0, len(other))) :]


Mutator = Callable[[Rng, Sample, list[Sample]], bytes]
MUTATORS: dict[str, Mutator] = {
    "random_bytes": lambda rng, s, _: rng.bytes(int(rng.integers(0, 600))),
    "truncate": lambda rng, s, _: s[1][: int(rng.integers(0, len(s[1])))],
    "edit_frame": lambda rng, s, _: _edit(rng, s[1]),
    "splice": lambda rng, s, pool: _splice(rng, s, pool),
    "edit_body": lambda rng, s, _: _body_edit(rng, s),
    "wrong_type": lambda rng, s, _: _tree_edit(rng, s, "replace"),
    "missing_field": lambda rng, s, _: _tree_edit(rng, s, "delete"),
    "extra_field": lambda rng, s, _: _tree_edit(rng, s, "add"),
    "frame_keys": lambda rng, s, _: _frame_keys(rng, s),
    "bomb": lambda rng, s, _: _bomb(rng, s),
    "deep_nesting": lambda rng, s, _: _deep(rng, s),
    "layout": lambda rng, s, _: _layout_edit(rng, s),
}


# --------------------------------------------------------------------------- campaign


def check_case(data: bytes, limits: DecodeLimits) -> str:
    """'accepted', 'rejected', or raises AssertionError / whatever escaped the decoder."""
    try:
        msg = decode(data, limits=limits)
    except DecodeError as e:
        assert str(e), "DecodeError without a message"
        return "rejected"
    assert decode(encode(msg), limits=limits) == msg, "accepted message does not round-trip"
    return "accepted"


def run_campaign(cases: int, seed: int, samples: list[Sample]) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    names = list(MUTATORS)
    stats = {n: {**dict.fromkeys(COUNTS, 0), "decode_s": 0.0} for n in names}
    failures: list[dict[str, Any]] = []
    started = time.perf_counter()
    for case in range(cases):
        name = names[case % len(names)]
        sample = samples[int(rng.integers(0, len(samples)))]
        data = MUTATORS[name](rng, sample, samples)
        limits = TIGHT_LIMITS if rng.random() < TIGHT_SHARE else DEFAULT_LIMITS
        row = stats[name]
        row["cases"] += 1
        t0 = time.perf_counter()
        try:
            row[check_case(data, limits)] += 1
        except BaseException as e:  # the point of the campaign: catch whatever escapes
            if isinstance(e, KeyboardInterrupt):
                raise
            row["other"] += 1
            if len(failures) < MAX_FAILURES_KEPT:
                failures.append(
                    {
                        "case": case,
                        "mutator": name,
                        "exception": f"{type(e).__name__}: {e}",
                        "input_hex": data[:256].hex(),
                        "traceback": traceback.format_exc(limit=6),
                    }
                )
        row["decode_s"] += time.perf_counter() - t0
    return {"stats": stats, "failures": failures, "seconds": time.perf_counter() - started}


def reference_rates(samples: list[Sample], repeats: int = 20) -> dict[str, float]:
    """Valid frames per second: strict decode vs. bare msgpack parsing of frame and body."""
    frames = [s[1] for s in samples if msgpack.unpackb(s[1])["codec"] == "none"]

    def rate(fn: Callable[[bytes], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for f in frames:
                fn(f)
            best = min(best, time.perf_counter() - t0)
        return len(frames) / best

    return {
        "strict_decode_per_s": rate(decode),
        "bare_msgpack_per_s": rate(lambda f: msgpack.unpackb(msgpack.unpackb(f)["body"])),
    }


def print_table(stats: dict[str, dict[str, Any]]) -> None:
    header = ("cases", 8), ("accepted", 9), ("DecodeError", 12), ("other", 6), ("µs/case", 8)
    print(f"\n{'mutation':<14} " + " ".join(f"{title:>{width}}" for title, width in header))
    for name, row in stats.items():
        us = 1e6 * row["decode_s"] / max(row["cases"], 1)
        print(
            f"{name:<14} {row['cases']:>8,} {row['accepted']:>9,} {row['rejected']:>12,} "
            f"{row['other']:>6} {us:>8.1f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=None, help=f"default {FULL_CASES:,}")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASES:,} cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    samples = build_samples(np.random.default_rng(args.seed), variants=4)
    reference = reference_rates(samples)
    result = run_campaign(cases, args.seed, samples)
    stats = result["stats"]
    print_table(stats)

    totals = {k: sum(row[k] for row in stats.values()) for k in COUNTS}
    decode_s = sum(row["decode_s"] for row in stats.values())
    speed = {
        "fuzz_cases_per_s": totals["cases"] / result["seconds"],
        "fuzz_decodes_per_s": totals["cases"] / decode_s,
        **reference,
    }
    ratios = {
        "fuzz_decode_vs_valid_decode": speed["fuzz_decodes_per_s"] / speed["strict_decode_per_s"],
        "strict_decode_vs_bare_msgpack": speed["strict_decode_per_s"] / speed["bare_msgpack_per_s"],
    }
    print(
        f"\n{totals['cases']:,} cases, {totals['rejected']:,} DecodeError, "
        f"{totals['accepted']:,} accepted, {totals['other']} other; "
        f"{speed['fuzz_cases_per_s']:,.0f} cases/s overall"
    )
    print(
        f"fuzz decode rate / valid decode rate: {ratios['fuzz_decode_vs_valid_decode']:.2f}; "
        f"strict / bare msgpack (valid frames): {ratios['strict_decode_vs_bare_msgpack']:.2f}"
    )
    report = {
        "environment": {
            "python": platform.python_version(),
            "msgpack": ".".join(map(str, msgpack.version)),
            "zstandard": zstandard.__version__,
            "machine": platform.machine(),
        },
        "config": {
            "cases": cases,
            "seed": args.seed,
            "valid_frames": len(samples),
            "tight_limits_share": TIGHT_SHARE,
        },
        "totals": totals,
        "per_mutation": stats,
        "speed": speed,
        "ratios": ratios,
        "failures": result["failures"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    for failure in result["failures"]:
        print(f"\nFAILURE ({failure['mutator']}): {failure['exception']}\n{failure['traceback']}")
    return 1 if totals["other"] else 0


if __name__ == "__main__":
    sys.exit(main())

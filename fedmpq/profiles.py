"""Device profiles and fleet mixes: what an emulated device is, read from TOML.

A device profile (``profiles/<name>.toml``) describes one kind of board or phone; a
fleet mix (``profiles/fleet-*.toml``) says how many of each kind a fleet holds.  Every
figure in a profile is an inline table ``{ value = ..., source = "..." }`` so that the
origin of each number (data sheet, published benchmark, or an estimate and how it was
derived) travels with it::

    name = "rpi-4b-4gb"
    description = "Raspberry Pi 4 Model B, 4 GB"

    [hardware]
    ram_mb = { value = 4096, source = "Raspberry Pi 4 product brief" }
    os_reserved_mb = { value = 250, source = "estimate: ..." }
    cores = { value = 4, source = "product brief" }
    cpu_freq_mhz = { value = 1500, source = "product brief" }
    gflops = { value = 8.0, source = "HPL, ..." }
    arch = "aarch64"

    [network]
    uplink_mbps = { value = 940, source = "..." }
    downlink_mbps = { value = 940, source = "..." }
    latency_ms = { value = 1.0, source = "..." }

    [availability]
    online_probability = { value = 0.98, source = "assumption: ..." }
    mean_session_rounds = { value = 50, source = "assumption: ..." }
    crash_probability = { value = 0.005, source = "assumption: ..." }

A fleet mix names profiles (files next to it) and a count of each::

    [[devices]]
    profile = "rpi-4b-4gb"
    count = 30

This module only parses and validates; ``edge_client.emulation`` makes a device obey
its profile.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmpq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MIB = 2**20

#: How an emulated device's compute time is obtained (``EmulatedDevice.compute_time``);
#: here, without torch, so command lines offer the choice before importing it.
MEASURED = "measured"  # host CPU time x host GFLOPS / profile GFLOPS
ANALYTIC = "analytic"  # FLOP count / profile GFLOPS (fedmpq.resources.training_seconds)
COMPUTE_TIMES = (MEASURED, ANALYTIC)

#: Required sourced figures per section: field -> (lowest allowed, highest allowed).
_FIGURES: dict[str, dict[str, tuple[float, float]]] = {
    "hardware": {
        "ram_mb": (16, 2**22),
        "os_reserved_mb": (0, 2**22),
        "cores": (1, 1024),
        "cpu_freq_mhz": (1, 10_000),
        "gflops": (1e-3, 1e6),
    },
    "network": {
        "uplink_mbps": (1e-3, 1e6),
        "downlink_mbps": (1e-3, 1e6),
        "latency_ms": (0, 60_000),
    },
    "availability": {
        "online_probability": (0.0, 1.0),
        "mean_session_rounds": (1.0, 1e9),
        "crash_probability": (0.0, 1.0),
    },
}
_PLAIN = {"hardware": {"arch"}, "network": set(), "availability": set()}


@dataclass(frozen=True)
class Figure:
    """One number of a profile and where it comes from."""

    value: float
    source: str


@dataclass(frozen=True)
class DeviceProfileSpec:
    """One kind of device, as a profile file describes it (see the module docstring)."""

    name: str
    description: str
    ram_mb: Figure
    os_reserved_mb: Figure
    cores: Figure
    cpu_freq_mhz: Figure
    gflops: Figure
    arch: str
    uplink_mbps: Figure
    downlink_mbps: Figure
    latency_ms: Figure
    online_probability: Figure
    mean_session_rounds: Figure
    crash_probability: Figure
    path: str = ""

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_mb.value * MIB)

    @property
    def free_ram_bytes(self) -> int:
        """RAM left for the agent once the operating system has taken its share."""
        return int((self.ram_mb.value - self.os_reserved_mb.value) * MIB)


@dataclass(frozen=True)
class FleetMix:
    """How many devices of each profile a fleet holds, in file order."""

    entries: tuple[tuple[DeviceProfileSpec, int], ...]
    path: str = ""

    @property
    def total(self) -> int:
        return sum(count for _, count in self.entries)

    def counts(self, clients: int) -> list[tuple[DeviceProfileSpec, int]]:
        """The mix scaled to ``clients`` devices, keeping its proportions.

        Largest-remainder rounding, so the counts add up to exactly ``clients``.
        """
        if clients < 1:
            raise ConfigError(f"a fleet needs at least one device, got {clients}")
        quotas = [count * clients / self.total for _, count in self.entries]
        counts = [int(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
        for i in by_remainder[: clients - sum(counts)]:
            counts[i] += 1
        return [(spec, n) for (spec, _), n in zip(self.entries, counts, strict=True)]

    def assign(self, clients: int, seed: int = 0) -> list[DeviceProfileSpec]:
        """The profile of each of ``clients`` devices (index -> profile).

        A seeded shuffle spreads every kind over all indices, so each agent process,
        which hosts a contiguous range of indices, hosts a mixed share of the fleet.
        """
        assigned = [spec for spec, n in self.counts(clients) for _ in range(n)]
        random.Random(seed).shuffle(assigned)
        return assigned


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def _figure(path: Path, where: str, raw: object, bounds: tuple[float, float]) -> Figure:
    if not isinstance(raw, Mapping) or set(raw) != {"value", "source"}:
        raise ConfigError(
            f'{path}: {where} must be an inline table {{ value = NUMBER, source = "..." }}'
            " naming where the figure comes from"
        )
    value, source = raw["value"], raw["source"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: {where}.value must be a number, got {value!r}")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{path}: {where}.source must say where the figure comes from")
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{path}: {where}.value = {value} is outside {low}..{high}")
    return Figure(float(value), source.strip())


def _section(path: Path, data: Mapping[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: missing [{name}] table")
    known = set(_FIGURES[name]) | _PLAIN[name]
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{path}: [{name}] has unknown field(s) {unknown}; known: {sorted(known)}"
        )
    values: dict[str, Any] = {}
    for field_name, bounds in _FIGURES[name].items():
        if field_name not in table:
            raise ConfigError(f"{path}: [{name}] misses {field_name}")
        values[field_name] = _figure(path, f"{name}.{field_name}", table[field_name], bounds)
    for field_name in _PLAIN[name]:
        value = table.get(field_name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: [{name}] needs {field_name} as a non-empty string")
        values[field_name] = value
    return values


def parse_profile(data: Mapping[str, Any], path: Path) -> DeviceProfileSpec:
    """Validate the TOML ``data`` of a device profile read from ``path``."""
    unknown = sorted(set(data) - {"name", "description", *_FIGURES})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field(s) {unknown}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f'{path}: needs name = "..."')
    values: dict[str, Any] = {}
    for section in _FIGURES:
        values |= _section(path, data, section)
    spec = DeviceProfileSpec(
        name=name, description=str(data.get("description", "")), path=str(path), **values
    )
    if spec.os_reserved_mb.value >= spec.ram_mb.value:
        raise ConfigError(f"{path}: hardware.os_reserved_mb must be below hardware.ram_mb")
    p = spec.online_probability.value
    if p < 1.0 and p / (1.0 - p) / spec.mean_session_rounds.value > 1.0:
        raise ConfigError(
            f"{path}: availability.online_probability = {p} cannot be reached with sessions"
            f" of {spec.mean_session_rounds.value} rounds; lengthen mean_session_rounds"
        )
    return spec


def load_profile(path: str | Path) -> DeviceProfileSpec:
    """Read and validate one device profile file."""
    path = Path(path)
    return parse_profile(_read_toml(path), path)


def load_fleet(path: str | Path) -> FleetMix:
    """Read a fleet mix file, or a single device profile as a fleet of one kind.

    Profiles a mix names are read from ``<name>.toml`` beside the mix file.
    """
    path = Path(path)
    data = _read_toml(path)
    if "devices" not in data:
        return FleetMix(((parse_profile(data, path), 1),), str(path))
    unknown = sorted(set(data) - {"devices", "description"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field(s) {unknown}")
    rows = data["devices"]
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path}: needs at least one [[devices]] entry")
    entries = []
    for i, row in enumerate(rows):
        where = f"{path}: devices[{i}]"
        if not isinstance(row, Mapping) or set(row) != {"profile", "count"}:
            raise ConfigError(f'{where} must hold exactly profile = "NAME" and count = N')
        count = row["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}.count must be a positive integer, got {count!r}")
        name = row["profile"]
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise ConfigError(f"{where}.profile must name a profile file beside {path.name}")
        entries.append((load_profile(path.parent / f"{name}.toml"), count))
    return FleetMix(tuple(entries), str(path))

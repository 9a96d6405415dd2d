"""Device profiles and fleet mixes: the shipped files, scaling, and errors that name the field."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmpq.errors import ConfigError
from fedmpq.profiles import Figure, load_fleet, load_profile

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
MIXED = PROFILES / "fleet-mixed.toml"
DEVICE_FILES = sorted(p for p in PROFILES.glob("*.toml") if not p.name.startswith("fleet-"))

GOOD = """
name = "board"
[hardware]
arch = "aarch64"
ram_mb = { value = 1024, source = "data sheet" }
os_reserved_mb = { value = 200, source = "estimate" }
cores = { value = 4, source = "data sheet" }
cpu_freq_mhz = { value = 1500, source = "data sheet" }
gflops = { value = 8.0, source = "HPL" }
[network]
uplink_mbps = { value = 100, source = "measured" }
downlink_mbps = { value = 100, source = "measured" }
latency_ms = { value = 1, source = "measured" }
[availability]
online_probability = { value = 0.9, source = "assumption" }
mean_session_rounds = { value = 10, source = "assumption" }
crash_probability = { value = 0.01, source = "assumption" }
"""


def test_every_shipped_profile_loads_with_a_source_for_each_figure():
    names = {p.stem for p in DEVICE_FILES}
    assert {"rpi-zero-2w", "rpi-3b-plus", "rpi-4b-2gb", "rpi-4b-4gb", "rpi-4b-8gb"} <= names
    assert {"rpi-5", "jetson-nano", "phone-midrange"} <= names
    for path in DEVICE_FILES:
        spec = load_profile(path)
        assert spec.name == path.stem
        figures = [v for v in vars(spec).values() if isinstance(v, Figure)]
        assert len(figures) == 11
        assert all(f.source for f in figures)
        assert 0 < spec.free_ram_bytes < spec.ram_bytes


def test_shipped_profiles_order_the_fleet_as_the_hardware_does():
    by_name = {p.stem: load_profile(p) for p in DEVICE_FILES}
    assert by_name["rpi-zero-2w"].gflops.value < by_name["rpi-4b-4gb"].gflops.value
    assert by_name["rpi-4b-4gb"].gflops.value < by_name["rpi-5"].gflops.value
    assert [by_name[f"rpi-4b-{g}gb"].ram_mb.value for g in (2, 4, 8)] == [2048, 4096, 8192]
    assert by_name["phone-midrange"].uplink_mbps.value < by_name["rpi-4b-4gb"].uplink_mbps.value


def test_mixed_fleet_counts_and_assignment():
    mix = load_fleet(MIXED)
    assert mix.total == 100
    assert len(mix.entries) == 8
    scaled = dict((spec.name, n) for spec, n in mix.counts(1000))
    assert scaled["rpi-zero-2w"] == 200 and scaled["phone-midrange"] == 250
    assigned = mix.assign(1000, seed=3)
    assert Counter(s.name for s in assigned) == Counter(scaled)
    assert [s.name for s in assigned] == [s.name for s in mix.assign(1000, seed=3)]
    # Spread over the indices, so each agent process hosts a mix.
    assert len({s.name for s in assigned[:500]}) == 8


@given(st.integers(min_value=1, max_value=5000))
def test_scaled_counts_add_up_and_keep_proportions(clients):
    mix = load_fleet(MIXED)
    counts = mix.counts(clients)
    assert sum(n for _, n in counts) == clients
    for (_, n), (_, original) in zip(counts, mix.entries, strict=True):
        assert abs(n - original * clients / mix.total) < 1


def test_a_single_profile_is_a_fleet_of_one_kind(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    mix = load_fleet(path)
    assert [s.name for s in mix.assign(3)] == ["board"] * 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('gflops = { value = 8.0, source = "HPL" }', "gflops = 8.0"), "hardware.gflops must"),
        (('source = "HPL"', 'source = " "'), "hardware.gflops.source"),
        (("ram_mb = { value = 1024", "ram_mb = { value = true"), "hardware.ram_mb.value"),
        (("value = 0.9,", "value = 1.5,"), "availability.online_probability.value = 1.5"),
        (("[network]", "[network]\nbandwidth = 3"), "unknown field(s) ['bandwidth']"),
        (('latency_ms = { value = 1, source = "measured" }', ""), "[network] misses latency_ms"),
        (("value = 200,", "value = 2000,"), "os_reserved_mb must be below"),
        (("value = 10, source", "value = 1, source"), "lengthen mean_session_rounds"),
    ],
)
def test_bad_profile_errors_name_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.toml"
    old, new = change
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_bad_fleet_errors_name_the_entry(tmp_path):
    (tmp_path / "board.toml").write_text(GOOD)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[devices]]\nprofile = "board"\ncount = 0\n')
    with pytest.raises(ConfigError, match=r"devices\[0\]\.count must be a positive integer"):
        load_fleet(fleet)
    fleet.write_text('[[devices]]\nprofile = "nope"\ncount = 2\n')
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_fleet(fleet)
    fleet.write_text("[[devices]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_fleet(fleet)

"""The fedmpq command lines: parsed (and refused) without importing torch, help texts
that list the policies and defaults in plain text, and the agent's data-share rule."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_client.agent_cli import parse_args
from fedmpq.policy_catalog import POLICIES

# Runs one command line in a fresh interpreter, then reports whether torch was imported.
_PROBE = """
import contextlib, io, sys
from fedmpq.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(repr(out.getvalue()))
print(code)
print('torch' in sys.modules)
"""


def _run(*argv: str) -> tuple[str, int, bool]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True
    )
    output, code, torch_loaded = result.stdout.strip().splitlines()[-3:]
    return eval(output), int(code), torch_loaded == "True"  # repr of a str, from our probe


COMMANDS = ["agent", "agent predict", "coordinator", "emulate", "export", "keys"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text_and_never_imports_torch(command: str) -> None:
    text, code, torch_loaded = _run(*command.split(), "--help")
    assert code == 0 and "usage: fedmpq" in text
    assert not torch_loaded
    for rst in ("``", ":func:", ":class:", ":meth:"):
        assert rst not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["agent", "--broker", "mqtt://h:1", "--bogus"], "unrecognized arguments"),
        (["agent", "--broker", "nope"], "invalid broker URL"),
        (["agent", "predict"], "the following arguments are required: input"),
        (["coordinator", "--broker", "mqtt://h:1", "--rounds", "x"], "invalid int value"),
        (["coordinator", "--broker", "mqtt://h:1", "--policy", "fedmpqq"], "policy.name"),
        (["coordinator", "--broker", "mqtt://h:1", "--quorum", "2"], "quorum: expected"),
        (["coordinator", "--broker", "nope"], "invalid broker URL"),
        (["emulate", "--policy", "fedmpqq"], "policy.name"),
        (["emulate", "--rounds", "0"], "rounds: expected an integer >= 1, got 0"),
        (["emulate", "--fleet", "profiles/nope.toml"], "cannot read profiles/nope.toml"),
        (["emulate", "--dataset", "idx:/nonexistent"], "/nonexistent is not a directory"),
        (["emulate", "--broker", "mqtt://127.0.0.1:1"], "cannot reach the broker"),
        (["emulate", "--config", "absent.toml"], "cannot read run config absent.toml"),
        (["export"], "the following arguments are required"),
        (["keys", "--out", "k.toml"], "name device ids or give --count"),
    ],
)
def test_argument_errors_never_import_torch(argv: list[str], message: str) -> None:
    text, code, torch_loaded = _run(*argv)
    assert code == 2
    assert message in text
    assert not torch_loaded


@pytest.mark.parametrize("command", ["coordinator", "emulate"])
def test_policy_help_lists_every_policy_and_the_default(command: str) -> None:
    text, _, _ = _run(command, "--help")
    for name in POLICIES:
        assert name in text
    assert "fixed" in text and "default" in text


def test_two_hand_started_devices_must_name_their_share() -> None:
    common = ["--broker", "mqtt://h:1", "--num-partitions", "2"]
    for unnamed in (["--client-id", "pi-a"], ["--id-prefix", "lab"]):
        with pytest.raises(SystemExit):
            parse_args([*common, *unnamed])
    a = parse_args([*common, "--client-id", "pi-a", "--partition-index", "0"])
    b = parse_args([*common, "--client-id", "pi-b", "--partition-index", "1"])
    assert (a.first_index, b.first_index) == (0, 1)
    with pytest.raises(SystemExit):
        parse_args([*common, "--client-id", "pi-c", "--partition-index", "2"])
    with pytest.raises(SystemExit):
        parse_args([*common, "--clients", "2", "--partition-index", "0"])
    # Hosted devices are numbered by --first-index, as the emulator starts them.
    assert parse_args([*common, "--clients", "2"]).first_index == 0


def test_emulate_checks_the_run_config_without_the_coordinator_package() -> None:
    code = (
        "import sys, edge_client.emulate, edge_client.agent_cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'coordinator', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

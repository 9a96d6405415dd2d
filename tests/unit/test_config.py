"""The run config: TOML plus overrides, one-line errors naming key, value and expectation,
and the README's table generated from the same declaration."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from coordinator.config import RunConfig, TrainingConfig, load_config
from fedmpq.errors import ConfigError
from fedmpq.run_config import reference_table
from fedmpq.settings import add_flags, as_flags, flag_values

README = Path(__file__).resolve().parents[2] / "README.md"


def test_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'run_id = "r1"\nrounds = 5\n[policy]\nname = "fixed"\nbits = 2\n[training]\nepochs = 2\n'
    )
    config = load_config(path, {"rounds": 7, "model": None})
    assert config.run_id == "r1"
    assert config.rounds == 7
    assert config.model == "cnn"
    assert config.policy_params() == ("fixed", {"bits": 2})
    assert config.training.epochs == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds = 0\n", "run config: rounds: expected an integer >= 1, got 0"),
        ("per_channel = 'no'\n", "run config: per_channel: expected a bool, got 'no'"),
        ("seed = 1.5\n", "run config: seed: expected an integer, got 1.5"),
        ("round_deadline_s = 'soon'\n", "round_deadline_s: expected a number, got 'soon'"),
        ("colour = 'red'\n", "unknown setting colour"),
        ("[training]\nbatch = 3\n", "unknown setting training.batch"),
        ("[training]\nlearning_rate = 0\n", "training.learning_rate: expected a number > 0"),
        ("training = 3\n", "training: expected a \\[training\\] table, got 3"),
        ("quorum = 2.0\n", "quorum: expected a number within 0..1, got 2.0"),
        ("observer = 'histogram'\n", "observer: expected one of minmax, mse, got 'histogram'"),
        ("scheme = 'affine'\nobserver = 'mse'\n", "mse works with the symmetric scheme"),
        ("budgets = [2, 9]\n", "expected average bits within 1..8, got 9.0"),
        ("client_budgets = {a = 'x'}\n", "client_budgets: expected a table of numbers"),
        ("[policy]\nname = 'fedmpqq'\n", "policy.name: expected one of float32, fixed"),
        ("[policy]\nbits = 4\n", "policy.name: expected one of .*, got None"),
        ("[policy]\nname = 'fixed'\nbits = 2.5\n", "policy.bits: expected an integer, got 2.5"),
        ("[policy]\nname = 'fixed'\nbitz = 2\n", "policy.bitz: policy 'fixed' takes bits"),
        ("rounds = [\n", "not valid TOML"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_configs_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"training\.epochs: expected an integer >= 1"):
        RunConfig(training=TrainingConfig(epochs=0))
    config = RunConfig(registration_timeout_s=3, budgets=[2, 4])
    assert isinstance(config.registration_timeout_s, float)
    assert config.budgets == [2.0, 4.0]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_flags_come_from_the_declaration() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, RunConfig)
    args = parser.parse_args(["--rounds", "3", "--no-per-channel", "--round-deadline", "9"])
    assert flag_values(args, RunConfig) == {
        "rounds": 3,
        "per_channel": False,
        "round_deadline_s": 9.0,
    }
    config = load_config(None, flag_values(args, RunConfig))
    assert (config.rounds, config.per_channel, config.round_deadline_s) == (3, False, 9.0)
    assert "default 20" in parser.format_help()
    values = {"rounds": 3, "per_channel": False, "compress": True, "run_id": "r", "quorum": 0.5}
    assert flag_values(parser.parse_args(as_flags(RunConfig, values)), RunConfig) == values
    with pytest.raises(TypeError, match="no command-line flag"):
        as_flags(RunConfig, {"training": {}})


def test_readme_table_is_the_declaration() -> None:
    text = README.read_text()
    found = re.search(r"<!-- run-config-table -->\n(.*?)\n<!-- /run-config-table -->", text, re.S)
    assert found, "README lost its <!-- run-config-table --> markers"
    assert found.group(1) == reference_table(), (
        "README's run config table differs from fedmpq/run_config.py; regenerate it with "
        "python -m fedmpq.run_config"
    )

import pytest

from coordinator.config import load_config
from fedmpq.errors import ConfigError


def test_toml_with_overrides(tmp_path):
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
    "text,message",
    [
        ("rounds = 0\n", "rounds must be >= 1"),
        ("colour = 'red'\n", "unknown setting"),
        ("[training]\nbatch = 3\n", "unknown setting"),
        ("quorum = 2.0\n", "quorum"),
        ("observer = 'histogram'\n", "observer: minmax, or mse"),
        ("scheme = 'affine'\nobserver = 'mse'\n", "mse with the symmetric scheme"),
        ("rounds = [\n", "not valid TOML"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")

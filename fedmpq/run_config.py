"""The run configuration, declared once: a TOML file, overridable from the command line.

Each setting below carries its type, default, range and help (:mod:`fedmpq.settings`);
the coordinator's flags and the README's config table are generated from it. Pure (no
torch), so ``fedmpq emulate`` checks a run before it starts anything.

Example ``run.toml``::

    run_id = "demo"
    model = "cnn"
    dataset = "fashion-mnist-small"
    rounds = 20
    clients_per_round = 10
    min_clients = 10

    [policy]
    name = "fixed"
    bits = 4

    [training]
    epochs = 1
    batch_size = 32
    learning_rate = 0.05
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmpq.errors import ConfigError
from fedmpq.policy_catalog import check_policy
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_AFFINE, SCHEME_SYMMETRIC
from fedmpq.settings import NO_FLAG, build, check, markdown_table, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The prefix of every configuration error, so a user sees where the mistake is.
WHERE = "run config"

#: Policies secure aggregation cannot run, and why (README: Secure aggregation).
SECURE_REFUSED = {
    "float32": "sends float32 weights, not codes on a grid",
    "qsgd": "sends deltas, which the global model's scale does not bound",
    "fedmpq": "learns from each device's dropped bit-planes and prunes them in the update",
}


@dataclass
class TrainingConfig:
    """Local training on each device (SGD, momentum 0.9)."""

    epochs: int = setting(1, "local epochs per round", minimum=1)
    batch_size: int = setting(32, "local mini-batch size", minimum=1)
    learning_rate: float = setting(0.05, "local SGD learning rate", above=0)


@dataclass
class RunConfig:
    """Everything a coordinator run needs; see the README's config reference."""

    run_id: str = setting("", "names the run and its output directory", shown_default="run-<time>")
    # The topic prefix is a connection flag shared with the agent (fedmpq.cli_common).
    topic_prefix: str = setting("fedmpq", "MQTT topic prefix", flag=NO_FLAG)
    model: str = setting("cnn", "mlp, cnn, resnet20 or resnet18")
    dataset: str = setting(
        "fashion-mnist-small", "the coordinator's held-out evaluation data (as agent --data)"
    )
    rounds: int = setting(20, "training rounds", minimum=1)
    clients_per_round: int = setting(
        0, "devices selected per round; 0 = every online one", minimum=0
    )
    min_clients: int = setting(1, "registered devices to wait for before round 1", minimum=1)
    registration_timeout_s: float = setting(
        300.0, "seconds to wait for min_clients devices", above=0
    )
    round_deadline_s: float = setting(
        300.0,
        "seconds a round waits for updates (it closes earlier when all answered)",
        above=0,
        flag="--round-deadline",
    )
    offline_grace_s: float = setting(
        5.0, "seconds a selected device that went offline is waited for", minimum=0
    )
    quorum: float = setting(
        0.0,
        "fraction of selected devices that must answer for a round to change the model",
        minimum=0,
        maximum=1,
    )
    seed: int = setting(0, "seeds selection and the initial model")
    scheme: str = setting(
        SCHEME_SYMMETRIC, "quantization grid", choices=(SCHEME_SYMMETRIC, SCHEME_AFFINE)
    )
    observer: str = setting(
        OBSERVER_MINMAX,
        "how symmetric scales are chosen: max|w| (minmax) or the clip of least squared"
        " error (mse; much better at 2-3 bits)",
        choices=(OBSERVER_MINMAX, OBSERVER_MSE),
    )
    per_channel: bool = setting(True, "one scale per output channel (else per tensor)")
    compress: bool = setting(False, "zstd payloads for devices that accept it")
    max_message_bytes: int = setting(
        64 * 2**20, "the decoder's and publisher's message size limit", minimum=1024,
        shown_default="67108864 (64 MiB)",
    )  # fmt: skip
    max_update_norm: float = setting(
        0.0, "reject updates further than this (L2) from the global model; 0 = off", minimum=0
    )
    clip_multiple: float = setting(
        10.0, "clip each update's change to this many times the round's median; 0 = off",
        minimum=0,
    )  # fmt: skip
    max_round_move: float = setting(
        10.0, "discard a round whose model moves this many times the recent median; 0 = off",
        minimum=0,
    )  # fmt: skip
    secure_aggregation: bool = setting(
        False, "secure aggregation: the coordinator learns only the sum of the round's updates"
        " (README: Secure aggregation; needs device_keys, clip_multiple = 0, max_update_norm = 0,"
        " policy fixed or fedlq)",
    )  # fmt: skip
    secure_step_s: float = setting(
        30.0, "seconds each secure-aggregation exchange (keys, shares, unmasking) waits",
        above=0,
    )  # fmt: skip
    device_keys: str = setting(
        "", "key file (fedmpq keys); when set, device frames must be signed with their key and"
        " everything the coordinator sends is signed with its key",
    )  # fmt: skip
    out_dir: str = setting(
        "", "where metrics, checkpoints and models go", shown_default="runs/<run_id>"
    )
    publish_onnx: bool = setting(
        True, "export the final model as ONNX and publish it (retained) to the devices"
    )
    policy: dict[str, Any] = setting(
        {"name": "fixed", "bits": 4},
        "the bit-allocation policy and its parameters (README: Bit-allocation policies)",
    )
    # Average-bit budgets set by hand (else derived from each device's profile).
    client_budgets: dict[str, float] = setting(
        {}, "average-bit budget per client id, e.g. {device-0000 = 2}"
    )
    budgets: list[float] = setting(
        [], "average-bit budgets given to the registered devices in sorted id order"
    )
    training: TrainingConfig = setting(TrainingConfig(), "local training")

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = time.strftime("run-%Y%m%d-%H%M%S")
        if not self.out_dir:
            self.out_dir = str(Path("runs") / self.run_id)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        check(self, WHERE)
        check_policy(self.policy, WHERE)
        if self.observer == OBSERVER_MSE and self.scheme != SCHEME_SYMMETRIC:
            raise ConfigError(f"{WHERE}: observer: mse works with the symmetric scheme only")
        bad = [b for b in [*self.client_budgets.values(), *self.budgets] if not 1 <= b <= 8]
        if bad:
            raise ConfigError(
                f"{WHERE}: client_budgets, budgets: expected average bits within 1..8, "
                f"got {bad[0]!r}"
            )
        self.check_secure()

    def check_secure(self) -> None:
        """With ``secure_aggregation``, refuse what needs to see individual updates."""
        if not self.secure_aggregation:
            return
        name = self.policy_params()[0]
        conflicts = {
            "max_update_norm": self.max_update_norm > 0
            and "bounds each update's norm, and updates are masked: set max_update_norm = 0",
            "clip_multiple": self.clip_multiple > 0
            and "clips each update against the round's median: set clip_multiple = 0",
            "policy": name in SECURE_REFUSED
            and f"{name} {SECURE_REFUSED.get(name, '')}; use fixed or fedlq",
            # Step frames carry no task token: only a device's key ties them to it.
            "device_keys": not self.device_keys
            and "needs signed device frames, or anyone could speak for a device in the key"
            " exchange: set device_keys (fedmpq keys)",
        }
        for key, problem in conflicts.items():
            if problem:
                raise ConfigError(f"{WHERE}: secure_aggregation with {key}: {problem}")

    def policy_params(self) -> tuple[str, dict[str, Any]]:
        """The policy's name and its parameters."""
        params = dict(self.policy)
        return str(params.pop("name")), params


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML) if given, apply ``overrides`` (top-level keys; ``None`` values
    are ignored), and check every setting.

    Raises
    ------
    ConfigError
        One line naming the file or the setting, the value and what is expected.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    result: RunConfig = build(RunConfig, values, WHERE)
    return result


def reference_table() -> str:
    """The README's config reference, generated from the declaration above."""
    header = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    return "\n".join([*header, *markdown_table(RunConfig)])


if __name__ == "__main__":
    print(reference_table())

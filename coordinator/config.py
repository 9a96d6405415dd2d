"""The run configuration: a TOML file, overridable from the command line.

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

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmpq.errors import ConfigError
from fedmpq.quant_spec import OBSERVER_MINMAX, OBSERVER_MSE, SCHEME_AFFINE, SCHEME_SYMMETRIC

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05


@dataclass
class RunConfig:
    """Everything a coordinator run needs; see the README's config reference."""

    run_id: str = ""
    topic_prefix: str = "fedmpq"
    model: str = "cnn"
    dataset: str = "fashion-mnist-small"
    rounds: int = 20
    clients_per_round: int = 0  # 0: every online client
    min_clients: int = 1  # registered devices to wait for before round 1
    registration_timeout_s: float = 300.0
    round_deadline_s: float = 300.0
    offline_grace_s: float = 5.0  # a selected device offline this long is given up on
    quorum: float = 0.0  # fraction of selected clients that must answer for a round to count
    seed: int = 0
    scheme: str = SCHEME_SYMMETRIC
    # How symmetric scales are chosen: max|w|, or the clip of least squared error
    # (much better at 2-3 bits; see fedmpq.quant).
    observer: str = OBSERVER_MINMAX
    per_channel: bool = True
    compress: bool = False
    max_message_bytes: int = 64 * 2**20
    max_update_norm: float = 0.0  # reject updates further than this (L2) from the model; 0 = off
    device_keys: str = ""  # key file (fedmpq keys); when set, device frames must be signed
    out_dir: str = ""
    publish_onnx: bool = True  # export the final model as ONNX and publish it to the devices
    policy: dict[str, Any] = field(default_factory=lambda: {"name": "fixed", "bits": 4})
    # Average-bit budgets set by hand (else derived from each device's profile):
    # per client id, and/or a list given to the registered clients in sorted id order.
    client_budgets: dict[str, float] = field(default_factory=dict)
    budgets: list[float] = field(default_factory=list)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = time.strftime("run-%Y%m%d-%H%M%S")
        if not self.out_dir:
            self.out_dir = str(Path("runs") / self.run_id)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        checks = [
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.clients_per_round >= 0, "clients_per_round must be >= 0 (0 = all)"),
            (self.min_clients >= 1, "min_clients must be >= 1"),
            (self.round_deadline_s > 0, "round_deadline_s must be > 0"),
            (0.0 <= self.quorum <= 1.0, "quorum must be within 0..1"),
            (self.scheme in (SCHEME_SYMMETRIC, SCHEME_AFFINE), "scheme: symmetric or affine"),
            (
                self.observer == OBSERVER_MINMAX
                or (self.observer == OBSERVER_MSE and self.scheme == SCHEME_SYMMETRIC),
                "observer: minmax, or mse with the symmetric scheme",
            ),
            ("name" in self.policy, "[policy] needs a name"),
            (self.training.epochs >= 1, "training.epochs must be >= 1"),
            (self.training.batch_size >= 1, "training.batch_size must be >= 1"),
            (self.training.learning_rate > 0, "training.learning_rate must be > 0"),
            (
                all(1 <= b <= 8 for b in [*self.client_budgets.values(), *self.budgets]),
                "client_budgets and budgets must be average bits within 1..8",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"run config: {message}")

    def policy_params(self) -> tuple[str, dict[str, Any]]:
        params = dict(self.policy)
        return str(params.pop("name")), params


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    kwargs = dict(values)
    if cls is RunConfig and isinstance(kwargs.get("training"), dict):
        kwargs["training"] = _build(TrainingConfig, kwargs["training"], f"{where} [training]")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML) if given, apply ``overrides`` (top-level keys; ``None`` values
    are ignored), and validate."""
    values: dict[str, Any] = {}
    where = "run config"
    if path is not None:
        where = str(path)
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return _build(RunConfig, values, where)

"""Splitting a data set among simulated clients: IID, Dirichlet label skew, label shards.

Every scheme returns disjoint index sets that together cover every sample exactly once, and is
a pure function of its arguments (the seed included).

Schemes
-------
``iid``
    A random permutation cut into ``num_clients`` near-equal parts.
``dirichlet``
    Label skew (Hsu et al. 2019) in its common per-class form: the samples of each class
    are divided among the clients in proportions drawn from ``Dirichlet(alpha, ..., alpha)``.
    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID.  The draw
    is repeated until every client has at least ``min_size`` samples.
``shards``
    The pathological split of McMahan et al. 2017: samples sorted by label (random order
    within a class), cut into ``num_clients * shards_per_client`` near-equal shards, and
    each client dealt ``shards_per_client`` random shards.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fedmpq.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "shards")
_DIRICHLET_RETRIES = 1000


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_partition(spec: str) -> tuple[str, dict]:
    """Parse ``"iid"``, ``"dirichlet:ALPHA"`` or ``"shards:N"``.

    Parameters
    ----------
    spec
        The command-line form of a partition scheme.

    Returns
    -------
    tuple of (str, dict)
        The scheme and keyword arguments for :func:`partition`, e.g.
        ``("dirichlet", {"alpha": 0.5})`` or ``("shards", {"shards_per_client": 2})``.

    Raises
    ------
    ConfigError
        For an unknown scheme or a missing or out-of-range parameter.
    """
    scheme, sep, arg = spec.strip().partition(":")
    if scheme == "iid" and not sep:
        return "iid", {}
    if scheme == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"partition {spec!r}: alpha must be a positive number")
        return "dirichlet", {"alpha": alpha}
    if scheme == "shards" and sep:
        if not arg.isdigit() or int(arg) < 1:
            raise ConfigError(f"partition {spec!r}: shards per client must be an integer >= 1")
        return "shards", {"shards_per_client": int(arg)}
    raise ConfigError(
        f"unknown partition {spec!r}; use 'iid', 'dirichlet:ALPHA' (e.g. dirichlet:0.5) "
        "or 'shards:N' (e.g. shards:2)"
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices among ``num_clients`` clients (the schemes are described in the
    module docstring).

    Parameters
    ----------
    labels
        ``(N,)`` non-negative integer labels.
    num_clients
        Number of parts (>= 1).
    scheme
        ``"iid"``, ``"dirichlet"`` or ``"shards"``.
    alpha
        Dirichlet concentration (> 0); ``dirichlet`` only.
    shards_per_client
        Shards per client (>= 1); ``shards`` only.
    seed
        Seed of the numpy generator; equal arguments give equal partitions.
    min_size
        Fewest samples any client may receive (>= 0).

    Returns
    -------
    list of ndarray
        ``num_clients`` sorted int64 index arrays, disjoint, covering ``range(N)``.

    Raises
    ------
    ConfigError
        For invalid arguments, or when no partition with ``min_size`` samples per client exists
        (or, for ``dirichlet``, none was drawn in 1000 tries).
    """
    labels = _checked_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    min_size = _check_int("min_size", min_size, 0)
    _check_enough_samples(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    parts = _split(labels, num_clients, scheme, alpha, shards_per_client, min_size, rng)
    result = [np.sort(p).astype(np.int64) for p in parts]
    smallest = min(len(p) for p in result)
    if smallest < min_size:
        raise ConfigError(
            f"{scheme} partition gives a client only {smallest} samples (< min_size {min_size}); "
            "use fewer clients or a smaller min_size"
        )
    return result


def _checked_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ConfigError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ConfigError("labels must be non-negative")
    return labels


def _check_enough_samples(n: int, num_clients: int, min_size: int) -> None:
    if n < num_clients * min_size:
        raise ConfigError(
            f"{n} samples cannot give {num_clients} clients {min_size} samples each; "
            "use fewer clients or a smaller min_size"
        )


def _split(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    alpha: float,
    shards_per_client: int,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The unsorted parts of ``scheme``, its own parameter checked first."""
    if scheme == "iid":
        return np.array_split(rng.permutation(len(labels)), num_clients)
    if scheme == "dirichlet":
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"dirichlet alpha must be a positive number, got {alpha!r}")
        return _dirichlet(labels, num_clients, float(alpha), min_size, rng)
    if scheme == "shards":
        spc = _check_int("shards_per_client", shards_per_client, 1)
        return _shards(labels, num_clients, spc, rng)
    raise ConfigError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_RETRIES):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                pieces[client].append(piece)
        parts = [np.concatenate(p) if p else np.empty(0, np.int64) for p in pieces]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) partition in {_DIRICHLET_RETRIES} draws gave all "
        f"{num_clients} clients >= {min_size} samples; raise alpha or lower num_clients/min_size"
    )


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ConfigError(
            f"{num_shards} shards ({num_clients} clients x {shards_per_client}) exceed the "
            f"{len(labels)} samples; use fewer clients or shards per client"
        )
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in order]

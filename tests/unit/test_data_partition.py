"""Splitting a data set among clients: IID, Dirichlet and shard partitions and their
command-line forms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpq.data import DatasetSplit, load_dataset, parse_partition, partition
from fedmpq.errors import ConfigError


@pytest.fixture(scope="module")
def shipped() -> DatasetSplit:
    return load_dataset("fashion-mnist-small")


labels_strategy = st.lists(st.integers(0, 9), min_size=1, max_size=300).map(
    lambda xs: np.asarray(xs, np.int64)
)


def check_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 for p in parts)
    merged = np.concatenate(parts)
    assert len(merged) == n
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))


@settings(max_examples=80, deadline=None)
@given(labels=labels_strategy, data=st.data(), seed=st.integers(0, 2**31))
def test_iid_and_shards_properties(labels: np.ndarray, data: st.DataObject, seed: int) -> None:
    n = len(labels)
    k = data.draw(st.integers(1, n))
    parts = partition(labels, k, "iid", seed=seed)
    check_cover(parts, n, k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1

    spc = data.draw(st.integers(1, max(1, n // k)))
    parts = partition(labels, k, "shards", shards_per_client=spc, seed=seed, min_size=0)
    check_cover(parts, n, k)
    assert min(len(p) for p in parts) >= spc * (n // (k * spc))
    assert [
        p.tolist()
        for p in partition(labels, k, "shards", shards_per_client=spc, seed=seed, min_size=0)
    ] == [p.tolist() for p in parts]


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_strategy,
    data=st.data(),
    alpha=st.floats(0.05, 100),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_properties(
    labels: np.ndarray, data: st.DataObject, alpha: float, seed: int
) -> None:
    n = len(labels)
    k = data.draw(st.integers(1, min(n, 8)))
    try:
        parts = partition(labels, k, "dirichlet", alpha=alpha, seed=seed)
    except ConfigError as e:
        # Legitimate only when minimum sizes could not be met by random draws.
        assert "draws" in str(e)
        return
    check_cover(parts, n, k)
    assert min(len(p) for p in parts) >= 1
    again = partition(labels, k, "dirichlet", alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_seed_changes_partition() -> None:
    labels = np.arange(1000) % 10
    for scheme in ("iid", "dirichlet", "shards"):
        a = partition(labels, 10, scheme, seed=1)
        b = partition(labels, 10, scheme, seed=2)
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)), scheme


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between client and global label distributions."""
    num_classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    dists = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(dists))


def test_dirichlet_skew_falls_with_alpha(shipped: DatasetSplit) -> None:
    labels = shipped.train.y
    skewed = label_skew(labels, partition(labels, 20, "dirichlet", alpha=0.1, seed=0))
    mild = label_skew(labels, partition(labels, 20, "dirichlet", alpha=100.0, seed=0))
    assert mild < 0.1 < 0.5 < skewed


def test_shards_give_few_classes() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "shards", shards_per_client=2, seed=0)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((np.zeros(10, np.int64), 0), {}),
        ((np.zeros(10, np.int64), 11), {}),
        ((np.zeros(10, np.int64), 2, "random"), {}),
        ((np.zeros(10, np.int64), 2, "dirichlet"), {"alpha": 0.0}),
        ((np.zeros(10, np.int64), 2, "dirichlet"), {"alpha": float("nan")}),
        ((np.zeros(10, np.int64), 2, "shards"), {"shards_per_client": 0}),
        ((np.zeros(10, np.int64), 4, "shards"), {"shards_per_client": 3}),
        ((np.zeros(10, np.float32), 2), {}),
        ((-np.ones(10, np.int64), 2), {}),
        ((np.zeros(10, np.int64), 2), {"min_size": 6}),
        ((np.zeros(10, np.int64), 2), {"min_size": -1}),
    ],
)
def test_partition_bad_arguments(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        partition(*args, **kwargs)


def test_dirichlet_gives_up_with_config_error() -> None:
    labels = np.repeat(np.arange(2), 5)
    with pytest.raises(ConfigError, match="raise alpha"):
        partition(labels, 5, "dirichlet", alpha=0.001, min_size=2)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", {})),
        ("dirichlet:0.5", ("dirichlet", {"alpha": 0.5})),
        ("dirichlet:100", ("dirichlet", {"alpha": 100.0})),
        ("shards:2", ("shards", {"shards_per_client": 2})),
    ],
)
def test_parse_partition(spec: str, expected: tuple[str, dict]) -> None:
    assert parse_partition(spec) == expected
    scheme, kwargs = expected
    assert len(partition(np.arange(100) % 10, 5, scheme, **kwargs)) == 5


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "iid:1",
        "dirichlet",
        "dirichlet:",
        "dirichlet:-1",
        "dirichlet:inf",
        "dirichlet:x",
        "shards",
        "shards:0",
        "shards:1.5",
        "pathological",
    ],
)
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_partition(spec)

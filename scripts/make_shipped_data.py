"""Make the Fashion-MNIST subset shipped in fedmpq/data/files from the original IDX files.

Picks a fixed number of images per class, uniformly at random with a fixed seed, from the
original training and test sets, keeps them in their original relative order, and writes them
as standard gzip-compressed IDX files (level 9, no timestamp, so reruns give identical bytes).

Usage, from the repository root (with fedmpq installed, or ``PYTHONPATH=.``)::

    python scripts/make_shipped_data.py --src /work/shared/data/fashion-mnist \\
        --dst fedmpq/data/files
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedmpq.data.idx import read_idx, write_idx


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random samples of every class in ``labels``."""
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> None:
    """Write the subset and print the file sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="directory of the original files")
    parser.add_argument("--dst", type=Path, required=True, help="output directory")
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20170825)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    args.dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for prefix, per_class in (("train", args.train_per_class), ("t10k", args.test_per_class)):
        images = read_idx(args.src / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.src / f"{prefix}-labels-idx1-ubyte.gz")
        keep = select(labels, per_class, rng)
        for kind, array in (("images-idx3", images[keep]), ("labels-idx1", labels[keep])):
            out = args.dst / f"{prefix}-{kind}-ubyte.gz"
            write_idx(out, array)
            size = out.stat().st_size
            total += size
            print(f"{out}: {array.shape} {size:,} bytes")
    print(f"total {total:,} bytes ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()

"""Data sets (loaded from a spec string) and their partitioning among clients."""

from fedmpq.data.datasets import ArrayDataset, DatasetSplit, load_dataset, subset
from fedmpq.data.idx import read_idx, write_idx
from fedmpq.data.partition import parse_partition, partition

__all__ = [
    "ArrayDataset",
    "DatasetSplit",
    "load_dataset",
    "parse_partition",
    "partition",
    "read_idx",
    "subset",
    "write_idx",
]

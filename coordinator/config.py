"""The run configuration. Declared in :mod:`fedmpq.run_config` (torch-free, shared with
``fedmpq emulate``, which checks a run before starting it); re-exported here for the
coordinator's modules."""

from fedmpq.run_config import RunConfig, TrainingConfig, load_config

__all__ = ["RunConfig", "TrainingConfig", "load_config"]

"""A round engine's state as a checkpoint, and back: what a killed run resumes from."""

from __future__ import annotations

import logging
from collections import Counter

from coordinator.checkpoint import Checkpoint, model_frame
from coordinator.engine import RoundEngine
from coordinator.validation import Rejections
from fedmpq.errors import FedmpqError
from fedmpq.wire.tensors import decode_state

log = logging.getLogger("fedmpq.coordinator")


def snapshot(engine: RoundEngine, round: int, cumulative_uplink: int) -> Checkpoint:
    """What a resumed run needs after ``round`` (between rounds: no round is open)."""
    cfg = engine.config
    return Checkpoint(
        run_id=cfg.run_id,
        round=round,
        global_frame=model_frame(cfg.run_id, round, cfg.model, engine.global_state),
        policy_state=engine.policy.state_dict(),
        devices=list(engine.registry.devices.values()),
        rng_state=engine.rng.getstate(),
        cumulative_uplink_bytes=cumulative_uplink,
        rejected=dict(engine.rejections.counts),
    )


def restore(engine: RoundEngine, ckpt: Checkpoint) -> None:
    """Continue ``engine`` from ``ckpt``, which must be of the same run."""
    cfg = engine.config
    if ckpt.run_id != cfg.run_id:
        raise FedmpqError(
            f"{cfg.out_dir} holds a checkpoint of run {ckpt.run_id!r}, not "
            f"{cfg.run_id!r}; pass --run-id {ckpt.run_id}"
        )
    glob = ckpt.global_model()
    engine.workload.global_state = decode_state(glob.tensors)
    engine.policy.load_state_dict(ckpt.policy_state)
    engine.registry.devices = {d.client_id: d for d in ckpt.devices}
    engine.rng.setstate(ckpt.rng_state)
    engine.rejections = Rejections(ckpt.rejected)
    engine.rejections_reported = Counter(ckpt.rejected)
    log.info("resumed after round %d from model %s", ckpt.round, glob.fingerprint)

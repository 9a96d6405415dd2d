"""A real device made to obey a profile: fleet emulation wraps the agent's device, it does not
branch inside the runtime.

The wrapper trains with the real device's data and code and adds what the profile binds
(``edge_client.emulation.ProfileBinding``): the profile it registers with, its free RAM for
the memory fit, churn and crashes, and the emulated round time (compute stretched by
GFLOPS, transfers over its links), optionally held back in real time.  It keeps no model or
data of its own: hundreds share one process's networks (``edge_client.shared_models``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from edge_client.device import Availability, Crashed, Outcome, RealDevice, Refused, fit_task
from edge_client.emulation import ProfileBinding
from edge_client.shared_models import ModelPool
from fedmpq.wire.messages import DeviceProfile, TaskMessage


class EmulatedDevice:
    """The real device ``real`` behaving as the profile of ``binding`` says (a :class:`Device`)."""

    def __init__(self, real: RealDevice, binding: ProfileBinding) -> None:
        self.real = real
        self.binding = binding
        self._profile = binding.reported_profile()

    @property
    def client_id(self) -> str:
        return self.real.client_id

    @property
    def key(self) -> bytes | None:
        return self.real.key

    @property
    def profile(self) -> DeviceProfile:
        return self._profile

    @property
    def num_samples(self) -> int:
        return self.real.num_samples

    @property
    def data_fingerprint(self) -> str:
        return self.real.data_fingerprint

    @property
    def online(self) -> bool:
        return self.binding.online

    def round_opened(self, round: int, global_bytes: int) -> Availability | None:
        """Step churn to round ``round + 1``; announce it if the coordinator does not know."""
        online = self.binding.open_round(round, global_bytes)
        if online is None:
            return None
        return Availability(online, round + 1, "emulated churn")

    def task_arrived(self, nbytes: int) -> None:
        self.binding.task_received(nbytes)

    def run_task(
        self, task: TaskMessage, global_state: Mapping[str, np.ndarray], models: ModelPool
    ) -> Outcome:
        if self.binding.crashes():
            return Crashed("crashed (emulated)")
        cost = models.cost(task.model_name)
        fitted = fit_task(self.client_id, task, cost, self.binding.available_ram, self.real.limits)
        if isinstance(fitted, Refused):
            return fitted
        models.warm_up(fitted, global_state, self.real.x, self.real.y)
        trained = self.real.train(fitted, global_state, models)
        compute_s = self.binding.compute_seconds(
            trained.host_seconds, cost, self.num_samples, fitted.epochs
        )
        usage = trained.update.usage
        usage.emulated_seconds = self.binding.emulated_seconds(compute_s, len(trained.frame))
        # msgpack floats are fixed-width: re-encoding keeps the size the time counts.
        frame = self.real.encode(trained.update, fitted)
        delay = usage.emulated_seconds - trained.result.seconds if self.binding.realtime else 0.0
        timing = {
            "host_seconds": trained.host_seconds,
            "compute_seconds": compute_s,
            "downlink_bytes": self.binding.downlink_bytes,
            "host_gflops": self.binding.host_gflops,
        }
        return replace(trained, frame=frame, delay=delay, timing=timing)

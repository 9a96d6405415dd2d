"""A rich progress bar over rounds, fed by the coordinator's per-round hook."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.mqtt_service import MqttCoordinator


def run_with_progress(coordinator: MqttCoordinator) -> list[dict[str, Any]]:
    """Run ``coordinator`` showing one bar step per round with accuracy and uplink."""
    columns = (
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("waiting for devices", total=coordinator.config.rounds)

        def on_round(row: dict[str, Any]) -> None:
            mb = row.get("cumulative_uplink_bytes", 0) / 1e6
            progress.update(
                task,
                completed=row["round"],
                description=f"acc {100 * row['accuracy']:5.2f}%  uplink {mb:7.2f} MB",
            )

        coordinator.on_round = on_round
        return coordinator.run()

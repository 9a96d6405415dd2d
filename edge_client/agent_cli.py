"""``fedmpq agent``: dispatch ``predict`` to the torch-free inference CLI, anything else
to the training agent (``edge_client.cli``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["predict"]:
        from edge_client.predict_cli import main as predict

        return predict(args[1:])
    from edge_client.cli import main as run_agent

    return run_agent(args)

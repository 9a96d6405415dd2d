"""``fedmpq agent``: dispatch ``predict`` and ``fetch-model`` to the torch-free inference
CLIs, anything else to the training agent (``edge_client.cli``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["predict"]:
        from edge_client.predict_cli import main as predict

        return predict(args[1:])
    if args[:1] == ["fetch-model"]:
        from edge_client.fetch_cli import main as fetch

        return fetch(args[1:])
    try:
        from edge_client.cli import main as run_agent
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(
            "fedmpq agent: training needs torch, which this install leaves out: install "
            "fedmpq[train] (deploy/install-agent.sh without --inference-only), or use "
            "'fedmpq agent fetch-model' and 'fedmpq agent predict' for inference only",
            file=sys.stderr,
        )
        return 2
    return run_agent(args)

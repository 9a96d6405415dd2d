"""The ``fedmpq`` command: dispatches to the agent, coordinator and emulation CLIs.

Each subcommand's module is imported only when it runs, so a device that has only
the agent's dependencies never imports the coordinator's.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "agent": ("edge_client.agent_cli", "run the on-device agent; agent predict INPUT classifies"),
    "coordinator": ("coordinator.cli", "run the coordinator against an MQTT broker"),
    "export": ("coordinator.export_cli", "export a run's model as mixed-precision ONNX"),
    "keys": ("fedmpq.keys_cli", "generate per-device signing keys"),
    "emulate": (
        "edge_client.emulate",
        "emulate a fleet on this machine (broker, coordinator, agents)",
    ),
}


def _usage() -> str:
    lines = ["usage: fedmpq COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "fedmpq COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from fedmpq import __version__

        print(f"fedmpq {__version__}")
        return 0
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        print(f"fedmpq: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(command[0])
    return int(module.main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())

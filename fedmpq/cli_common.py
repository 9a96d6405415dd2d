"""What the ``fedmpq`` commands share: the parser style, broker/topic/log flags, logging.

Nothing here imports torch: a command parses (and reports argument errors) first and
imports its heavy modules only when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re

from fedmpq.mqtt import BrokerAddress

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def plain(doc: str | None) -> str:
    """A module docstring as help text: reStructuredText roles and backticks removed."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", doc or "")
    return text.replace("``", "").replace("`", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and shows each set default as ``(default X)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, "", argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text:
            text += " (default %(default)s)"
        return text


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for one ``fedmpq`` command, described by its module docstring."""
    return argparse.ArgumentParser(prog=prog, description=plain(doc), formatter_class=HelpFormatter)


def add_connection_flags(parser: argparse.ArgumentParser, *, topic_prefix: str | None) -> None:
    """``--broker``, ``--ca-file``, ``--protocol`` and ``--topic-prefix``.

    Parameters
    ----------
    topic_prefix
        The prefix's default; ``None`` leaves it to the run config.
    """
    parser.add_argument(
        "--broker",
        default=os.environ.get("FEDMPQ_BROKER"),
        required="FEDMPQ_BROKER" not in os.environ,
        help="mqtt://[USER:PASSWORD@]HOST:PORT (mqtts:// for TLS); default $FEDMPQ_BROKER,"
        " which keeps the password off the command line",
    )
    parser.add_argument(
        "--ca-file",
        default=os.environ.get("FEDMPQ_CA_FILE") or None,
        help="CA certificate that signed the broker's (mqtts://); default $FEDMPQ_CA_FILE",
    )
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    parser.add_argument(
        "--topic-prefix",
        default=topic_prefix,
        help="MQTT topic prefix" + ("" if topic_prefix else " (default: the run config's)"),
    )


def add_log_flag(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """``--log-level``."""
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log messages of this level and above",
    )


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` with timestamps and logger names."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def broker_address(args: argparse.Namespace) -> BrokerAddress:
    """The broker named by :func:`add_connection_flags`' flags.

    Raises
    ------
    ConfigError
        If ``--broker`` is not an MQTT URL.
    """
    address = BrokerAddress.parse(args.broker)
    if args.ca_file is None:  # keep a CA the URL names (mqtts://...?ca=FILE)
        return address
    return dataclasses.replace(address, ca_file=args.ca_file)

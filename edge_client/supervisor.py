"""Child processes of one command, watched together: the first that fails stops the rest.

``fedmpq emulate`` runs the coordinator and a few agent processes. When one of them
fails, the others cannot finish the run; waiting for their timeouts hid the reason for
minutes. :func:`supervise` notices an exit within a poll interval, names the child and
its last error line, and stops the others.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

#: How often children are polled: a failure is reported well within 2 s.
POLL_S = 0.2

#: Words that mark a log line as the error worth showing (else the last line is shown).
_ERROR_MARKS = ("error", "fedmpq ", "cannot", "failed", "traceback")


@dataclass
class Child:
    """One started process, the name it is reported by and the file it logs to.

    Attributes
    ----------
    done_ok
        Whether exiting with status 0 means this child finished its part (agents that
        exit when the run is done) rather than that something went wrong.
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    done_ok: bool = False


@dataclass(frozen=True)
class Failure:
    """Why a supervised run stopped early."""

    child: Child
    returncode: int
    line: str

    def __str__(self) -> str:
        return f"{self.child.name} exited with status {self.returncode}: {self.line}"


def last_error_line(log: Path) -> str:
    """The last line of ``log`` that reads like an error, else its last non-empty line."""
    try:
        text = log.read_bytes()[-65536:].decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {log}: {exc})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(mark in line.lower() for mark in _ERROR_MARKS):
            return line
    return lines[-1] if lines else f"(nothing in {log})"


def supervise(main: Child, others: list[Child]) -> Failure | None:
    """Wait for ``main`` to exit; return the first failure among all children, if any.

    A child fails when it exits with a non-zero status, or with status 0 before ``main``
    has finished unless its ``done_ok`` says that is how it finishes.
    """
    while True:
        for child in (main, *others):
            code = child.process.poll()
            if code is None or (code == 0 and (child.done_ok or child is main)):
                continue
            return Failure(child, code or 1, last_error_line(child.log))
        if main.process.poll() == 0:
            return None
        time.sleep(POLL_S)


def stop_processes(
    processes: list[subprocess.Popen[bytes]], timeout: float, grace: float = 10.0
) -> None:
    """Wait up to ``timeout`` s in all for ``processes`` to exit; then terminate the rest
    together, and kill what is still running ``grace`` s later."""
    _wait_all(processes, timeout)
    running = [proc for proc in processes if proc.poll() is None]
    for proc in running:
        proc.terminate()
    _wait_all(running, grace)
    for proc in running:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return

"""Watching the emulator's children: the first failure is named with its last error line,
and the others are stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_client.supervisor import Child, last_error_line, stop_processes, supervise

WAIT_FOREVER = "import sys; sys.stdin.read()"


def _child(tmp_path: Path, name: str, code: str, done_ok: bool = False) -> Child:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=out, stderr=out
        )
    return Child(name, process, log, done_ok)


def test_a_failing_child_is_named_with_its_error_and_the_rest_stopped(tmp_path: Path) -> None:
    main = _child(tmp_path, "coordinator", WAIT_FOREVER)
    failing = _child(
        tmp_path,
        "agent 0",
        "import sys; print('loading');"
        " print('fedmpq agent: cannot read nope.toml', file=sys.stderr); print('bye'); sys.exit(2)",
        done_ok=True,
    )
    failure = supervise(main, [failing])
    assert failure is not None
    assert (failure.child.name, failure.returncode) == ("agent 0", 2)
    assert failure.line == "fedmpq agent: cannot read nope.toml"
    assert "agent 0 exited with status 2" in str(failure)
    stop_processes([main.process, failing.process], timeout=0, grace=2)
    assert main.process.poll() is not None


def test_a_finished_run_is_no_failure(tmp_path: Path) -> None:
    main = _child(tmp_path, "coordinator", "print('done')")
    agent = _child(tmp_path, "agent 0", "print('done')", done_ok=True)
    assert supervise(main, [agent]) is None


def test_the_main_child_failing_is_reported(tmp_path: Path) -> None:
    main = _child(tmp_path, "coordinator", "raise ValueError('unknown model')")
    agent = _child(tmp_path, "agent 0", WAIT_FOREVER, done_ok=True)
    failure = supervise(main, [agent])
    assert failure is not None and failure.child is main
    assert failure.line == "ValueError: unknown model"
    stop_processes([agent.process], timeout=0, grace=2)
    assert agent.process.poll() is not None


def test_last_error_line_falls_back_to_the_last_line(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("one\ntwo\n\n")
    assert last_error_line(log) == "two"
    log.write_text("")
    assert last_error_line(log).startswith("(nothing in")
    assert last_error_line(tmp_path / "absent.log").startswith("(cannot read")

"""The selector thread that serves every MQTT connection of a process: :class:`MqttLoop`."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fedmpq.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from fedmpq.mqtt.connection import Connection

# One logger for the whole package: the name users configure.
logger = logging.getLogger("fedmpq.mqtt")

# loop_misc (keepalive pings, CONNACK/PINGRESP timeouts) needs a tick at least this often.
MISC_INTERVAL = 1.0
# Bounds how long one attempt can hold a connect worker when the broker is unreachable.
CONNECT_TIMEOUT = 5.0


class Timer:
    """A callback scheduled with ``MqttLoop._call_later``; set ``cancelled`` to drop it."""

    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False


class MqttLoop:
    """One selector thread serving many paho clients.

    Parameters
    ----------
    name
        Name of the loop thread (shows in logs and debuggers).
    connect_workers
        Threads that run blocking TCP connects and TLS handshakes.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, name: str = "fedmpq-mqtt", *, connect_workers: int = 4) -> None:
        if connect_workers < 1:
            raise ConfigError(f"connect_workers must be at least 1, got {connect_workers}")
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._callbacks: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._executor = ThreadPoolExecutor(connect_workers, thread_name_prefix=f"{name}-connect")
        self._connections: set[Connection] = set()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._finished = False

    def __enter__(self) -> MqttLoop:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the loop thread.

        Raises
        ------
        TransportError
            If the loop was already started (a stopped loop cannot be restarted).
        """
        if self._thread is not None:
            raise TransportError("MqttLoop.start() called twice: create a new MqttLoop instead")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection (sending DISCONNECT where possible) and end the thread.

        Parameters
        ----------
        timeout
            Seconds to wait for the thread; connections still open after a grace period
            (a little more than one connect timeout) are dropped without DISCONNECT.
            Called on the loop thread (from a callback), it only starts the shutdown.
        """
        thread = self._thread
        if thread is None or self._finished:
            return
        if self.in_loop_thread():
            self._begin_stop()  # the thread ends once this callback returns and drains
            return
        with contextlib.suppress(TransportError):  # it stopped meanwhile
            self.call_soon(self._begin_stop)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("MQTT loop %s did not stop within %.1f s", self._name, timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread, after the callbacks queued before it.

        Thread-safe; wakes the selector.  An exception ``fn`` raises is logged.

        Raises
        ------
        TransportError
            If the loop has stopped.
        """
        if self._finished:
            raise TransportError(f"MQTT loop {self._name} has stopped")
        self._callbacks.append(fn)
        if not self.in_loop_thread():
            # A full wake-up buffer (BlockingIOError) already guarantees a wake-up.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on the loop thread."""
        return threading.get_ident() == self._thread_id

    # -- used by Connection, on the loop thread ---------------------------------

    def _call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), timer))
        return timer

    def _run_blocking(
        self, fn: Callable[[], object], done: Callable[[BaseException | None], None]
    ) -> None:
        def finished(future: Future[object]) -> None:
            exc = future.exception()
            if not self._finished:
                self.call_soon(lambda: done(exc))

        self._executor.submit(fn).add_done_callback(finished)

    def _watch(self, sock: Any, conn: Connection, write: bool) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        # A socket closed behind our back would leave its fd registered; its number may
        # come back for this one, which must win.
        self._unwatch(sock)
        self._selector.register(sock, mask, conn)

    def _set_write(self, sock: Any, write: bool) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return  # not watched (yet): _watch reads want_write() when it registers
        if key.events != mask:
            self._selector.modify(sock, mask, key.data)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        next_misc = time.monotonic() + MISC_INTERVAL
        try:
            while not (self._stopping and self._drained()):
                now = time.monotonic()
                deadline = min(next_misc, self._timers[0][0]) if self._timers else next_misc
                if self._stopping:
                    deadline = min(deadline, self._stop_deadline)
                timeout = 0.0 if self._callbacks else max(0.0, deadline - now)
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        call_guarded(key.data._on_ready, key.fileobj, mask)
                self._run_callbacks()
                self._run_timers()
                if time.monotonic() >= next_misc:
                    next_misc = time.monotonic() + MISC_INTERVAL
                    for key in list(self._selector.get_map().values()):
                        if key.data is not None:
                            call_guarded(key.data._misc)
        finally:
            self._finished = True
            self._teardown()

    def _drained(self) -> bool:
        return not self._connections or time.monotonic() >= self._stop_deadline

    def _begin_stop(self) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + CONNECT_TIMEOUT + 1.0
        for conn in list(self._connections):
            conn._close_on_loop()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_callbacks(self) -> None:
        # Only what was queued before this pass: callbacks that queue callbacks must not
        # starve the selector.
        for _ in range(len(self._callbacks)):
            call_guarded(self._callbacks.popleft())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                call_guarded(timer.fn)

    def _teardown(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                logger.warning("%s: dropped without DISCONNECT at loop stop", key.data.client_id)
                self._selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        for conn in list(self._connections):
            conn._finish_close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def call_guarded(fn: Callable[..., object], *args: object) -> None:
    """Run a callback on the loop thread; log what it raises instead of dying."""
    try:
        fn(*args)
    except Exception:
        logger.exception("error in MQTT loop callback %r", fn)

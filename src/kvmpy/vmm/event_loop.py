"""One epoll-driven thread that serves file descriptors: eventfds, sockets, a console's stdin.

Device backends and front ends register descriptors here instead of starting threads of their
own, as Firecracker's and cloud-hypervisor's event managers do. A machine has one loop for its
console and control channel; a device with busy queues may own another (its I/O thread), so two
busy devices progress in parallel.

    loop = EventLoop("vm0-io")
    loop.add_reader(efd, on_notify)      # on_notify() runs in the loop's thread
    loop.call_soon(fn)                   # from any thread
    loop.call_later(0.5, fn)
    loop.start(); ...; loop.stop()

Callbacks run one at a time in the loop's thread. A callback that raises is logged and its
descriptor removed (the loop itself keeps running); `on_error(exc)` is told, so the owner can
stop the VM with a reason instead of losing a device silently.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

from ..hv.signals import helper_thread_signals

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class EventLoop:
    def __init__(
        self, name: str = "kvmpy-loop", on_error: Callable[[BaseException], None] | None = None
    ):
        self.name = name
        self.on_error = on_error
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._soon: deque[Callback] = deque()
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # --- registration (any thread) ---------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call `callback()` in the loop thread whenever `fd` is readable (level-triggered:
        the callback must drain what it can, or it is called again at once)."""
        self._watch(fd, 0, callback)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching `fd` for input; returns whether it was watched. Safe from inside a
        callback."""
        return self._unwatch(fd, 0)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is writable (level-triggered: remove the writer
        once there is nothing left to write)."""
        self._watch(fd, 1, callback)

    def remove_writer(self, fd: int) -> bool:
        return self._unwatch(fd, 1)

    def _watch(self, fd: int, which: int, callback: Callback) -> None:
        with self._lock:
            try:
                key = self._sel.get_key(fd)
            except (KeyError, ValueError, RuntimeError):  # RuntimeError: the loop is closed
                key = None
            cbs = list(key.data) if key is not None else [None, None]
            cbs[which] = callback
            self._set(fd, key, cbs)
        self._wake()

    def _unwatch(self, fd: int, which: int) -> bool:
        with self._lock:
            try:
                key = self._sel.get_key(fd)
            except (KeyError, ValueError, RuntimeError):  # RuntimeError: the loop is closed
                return False
            cbs = list(key.data)
            if cbs[which] is None:
                return False
            cbs[which] = None
            self._set(fd, key, cbs)
        self._wake()
        return True

    def _set(self, fd: int, key, cbs: list) -> None:
        events = (selectors.EVENT_READ if cbs[0] else 0) | (selectors.EVENT_WRITE if cbs[1] else 0)
        if not events:
            self._sel.unregister(fd)
        elif key is None:
            self._sel.register(fd, events, tuple(cbs))
        else:
            self._sel.modify(fd, events, tuple(cbs))

    def call_soon(self, fn: Callback) -> None:
        """Run `fn()` in the loop thread, soon; from any thread."""
        with self._lock:
            self._soon.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callback) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), next(self._seq), fn))
        self._wake()

    @property
    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the callback under way) and close the loop."""
        self._stopping = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive() and not self.in_loop_thread:
            return  # stop() first; closing under a running loop would race its select()
        self._closed = True
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> EventLoop:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or the loop is closed

    def _run(self) -> None:
        helper_thread_signals()
        while not self._stopping:
            timeout = None
            with self._lock:
                if self._soon:
                    timeout = 0.0
                elif self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = self._sel.select(timeout)
            except OSError as e:  # a descriptor closed under us: drop it rather than spin
                log.warning("%s: select failed: %s", self.name, e)
                events = []
                self._drop_closed()
            for key, mask in events:
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                reader, writer = key.data
                if mask & selectors.EVENT_READ and reader is not None:
                    self._call(reader, key.fd)
                # the reader may have removed the writer (or closed the descriptor)
                if mask & selectors.EVENT_WRITE and writer is not None:
                    writer = self._current(key.fd, 1)
                    if writer is not None:
                        self._call(writer, key.fd, 1)
                if self._stopping:
                    return
            self._run_due()

    def _run_due(self) -> None:
        now = time.monotonic()
        todo: list[Callback] = []
        with self._lock:
            while self._soon:
                todo.append(self._soon.popleft())
            while self._timers and self._timers[0][0] <= now:
                todo.append(heapq.heappop(self._timers)[2])
        for fn in todo:
            if self._stopping:
                return
            self._call(fn, None)

    def _current(self, fd: int, which: int) -> Callback | None:
        with self._lock:
            try:
                return self._sel.get_key(fd).data[which]
            except (KeyError, ValueError, RuntimeError):
                return None

    def _call(self, fn: Callback, fd: int | None, which: int = 0) -> None:
        try:
            fn()
        except BaseException as e:  # a device bug must not take the loop down with it
            log.error("%s: callback %r failed: %s", self.name, fn, e, exc_info=True)
            if fd is not None:
                self._unwatch(fd, which)
            if self.on_error is not None:
                try:
                    self.on_error(e)
                except Exception:
                    log.exception("%s: on_error failed", self.name)

    def _drop_closed(self) -> None:
        with self._lock:
            for key in list(self._sel.get_map().values()):
                if key.data is None:
                    continue
                try:
                    os.fstat(key.fd)
                except OSError:
                    self._sel.unregister(key.fd)

"""What every virtio device has, whatever its transport: features, status, queues, config
space, reset, and the rule that a guest breaking the protocol breaks only its device.

A device model subclasses `VirtioDevice` and fills in `device_id`, its feature bits, its
config space (`config_bytes`) and `handle(queue)`, which drains a queue. The transport
(virtio-mmio, virtio-pci) maps registers onto the methods here and delivers interrupts.

Threads. Queues are served by the device's I/O thread (an `EventLoop`): a guest notify lands
on an ioeventfd the loop watches, or, without ioeventfd, the transport's `write()` on the
vCPU thread only schedules the work (`notify` -> `loop.call_soon`). Register writes that change
the device's state (status, reset, queue enable) and the I/O thread's queue work take the
device's lock, so a reset never runs under a half-processed queue. Without a loop (unit
tests, fuzzing) the work runs inline, which is the same code.

Errors. A `QueueError` (or a guest address outside RAM) marks the device DEVICE_NEEDS_RESET
and raises a configuration-change interrupt if the driver is running (2.1.2); the device then
ignores its queues until the driver resets it. Any other exception in device code is a kvmpy
bug: it is logged with its traceback, counted in `internal_errors`, and handled the same way,
so a bug stops a device, never the VMM.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ...errors import GuestMemoryError
from ...memory import GuestMemory
from .constants import (
    DEVICE_NAMES,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
)
from .queue import QueueError, Virtqueue

if TYPE_CHECKING:
    from ...vmm.event_loop import EventLoop

log = logging.getLogger(__name__)

#: Features every kvmpy device offers (VIRTIO 1.x only: no legacy interface).
COMMON_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX


class Transport(Protocol):
    def interrupt(self, reason: int, queue: Virtqueue | None) -> None:
        """Tell the driver: INT_USED_BUFFER on `queue`, or INT_CONFIG_CHANGE."""

    def activated(self) -> None:
        """The driver set DRIVER_OK (wire ioeventfds for the ready queues)."""

    def deactivated(self) -> None:
        """The device was reset (unwire them)."""


class VirtioDevice:
    device_id = 0
    #: Device-specific feature bits this model implements end to end.
    features = 0

    def __init__(self, name: str, queue_sizes: Sequence[int]):
        self.name = name
        self.queues = [Virtqueue(i, n) for i, n in enumerate(queue_sizes)]
        self.memory: GuestMemory | None = None
        self.transport: Transport | None = None
        self.loop: EventLoop | None = None
        self.lock = threading.RLock()
        self.device_features = COMMON_FEATURES | self.features
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        #: Why the device needs a reset (None: it does not).
        self.broken: str | None = None
        # Counters (--stats / --json)
        self.notifies = 0
        self.requests = 0
        self.interrupts = 0
        self.errors = 0
        self.internal_errors = 0
        self.resets = 0
        #: Drains that busy-polling found without a notify.
        self.polled = 0
        #: Busy-poll the queue this long after each drain (0: sleep at once).
        self.poll_us = 0
        #: Set while a snapshot waits for the device: queue work stops between chains.
        self.quiescing = False
        self._watched: dict[int, int] = {}

    @property
    def kind(self) -> str:
        return DEVICE_NAMES.get(self.device_id, str(self.device_id))

    def bind(self, memory: GuestMemory, transport: Transport) -> None:
        self.memory = memory
        self.transport = transport

    def use_loop(self, loop: EventLoop | None) -> None:
        """Serve the queues on `loop`'s thread (None: inline, in the caller's thread)."""
        self.loop = loop

    # --- features ------------------------------------------------------------------------

    def device_features_word(self, select: int) -> int:
        if not 0 <= select <= 1:
            return 0  # 2.2: bits past 63 are reserved; report them as not offered
        return (self.device_features >> (32 * select)) & 0xFFFF_FFFF

    def write_driver_features_word(self, select: int, value: int) -> None:
        with self.lock:
            # 3.1.1: features are set between DRIVER and FEATURES_OK; later writes are ignored.
            if self.status & STATUS_FEATURES_OK or not 0 <= select <= 1:
                return
            shift = 32 * select
            mask = 0xFFFF_FFFF << shift
            self.driver_features = (self.driver_features & ~mask) | ((value & 0xFFFF_FFFF) << shift)

    def has(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    def accept_features(self, features: int) -> bool:
        """May the driver run with `features`? (Device-specific checks in subclasses.)"""
        return True

    # --- status and reset ----------------------------------------------------------------

    def set_status(self, value: int) -> None:
        value &= 0xFF
        with self.lock:
            if value == 0:
                self.reset()
                return
            old = self.status
            value &= ~STATUS_DEVICE_NEEDS_RESET  # the device's bit, not the driver's
            value |= old & STATUS_DEVICE_NEEDS_RESET
            if old & ~value:
                return  # 2.1.1: the driver never clears bits except by a reset
            new = value & ~old
            if new & STATUS_FEATURES_OK and not self._features_ok():
                value &= ~STATUS_FEATURES_OK  # 3.1.1: the driver re-reads and sees it refused
                new &= ~STATUS_FEATURES_OK
            if new & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
                value &= ~STATUS_DRIVER_OK
                new &= ~STATUS_DRIVER_OK
            self.status = value
            if new & STATUS_DRIVER_OK and not value & STATUS_FAILED:
                self._activate()

    def _features_ok(self) -> bool:
        f = self.driver_features
        if f & ~self.device_features or not f & F_VERSION_1:
            return False
        if not self.status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER):
            return False
        return self.accept_features(f)

    def _activate(self) -> None:
        self.activate()
        if self.transport is not None:
            self.transport.activated()
        # Buffers the driver made available before DRIVER_OK (receive buffers, typically)
        # had no notify we would act on: look at every queue once.
        for q in self.queues:
            if q.ready:
                self.notify(q.index)

    @property
    def running(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and self.broken is None

    def reset(self) -> None:
        """Back to the state after power-on (2.1.2 / 4.x.2: writing 0 to the status)."""
        with self.lock:
            was_running = self.status & STATUS_DRIVER_OK
            if self.transport is not None and was_running:
                self.transport.deactivated()
            self.unwatch_all()
            self.status = 0
            self.driver_features = 0
            self.broken = None
            for q in self.queues:
                q.reset()
            self.resets += 1
            self.on_reset()

    def fail(self, reason: str) -> None:
        """The guest broke the protocol (or kvmpy did): DEVICE_NEEDS_RESET, config interrupt."""
        with self.lock:
            self.errors += 1
            if self.broken is not None:
                return
            self.broken = reason
            log.warning("%s: needs reset: %s", self.name, reason)
            self.status |= STATUS_DEVICE_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK and self.transport is not None:
                self.transport.interrupt(INT_CONFIG_CHANGE, None)

    # --- queues --------------------------------------------------------------------------

    def enable_queue(self, q: Virtqueue) -> None:
        """The driver set Queue Ready / queue_enable."""
        with self.lock:
            if q.ready or self.broken is not None or self.memory is None:
                return
            if not self.status & STATUS_FEATURES_OK:
                return  # 3.1.1: queues are set up after the features are agreed
            try:
                q.enable(self.memory, self.has(F_EVENT_IDX), self.has(F_INDIRECT_DESC))
            except QueueError as e:
                self.fail(str(e))

    def notify(self, index: int) -> None:
        """The driver notified queue `index` (from the transport, any thread)."""
        self.notifies += 1
        loop = self.loop
        if loop is not None and not loop.in_loop_thread:
            loop.call_soon(lambda: self.process(index))
        else:
            self.process(index)

    def process(self, index: int) -> None:
        """Drain queue `index` (in the I/O thread)."""
        with self.lock:
            if not self.running or not 0 <= index < len(self.queues):
                return
            q = self.queues[index]
            if not q.ready:
                return
            try:
                self.handle(q)
                if self.poll_us and self.loop is not None:
                    self._poll(q)
            except (QueueError, GuestMemoryError) as e:
                self.fail(str(e))
            except Exception as e:  # a kvmpy bug: stop this device, not the VMM
                self.internal_errors += 1
                log.exception("%s: internal error on queue %d", self.name, index)
                self.fail(f"internal error: {type(e).__name__}: {e}")

    def next_chain(self, q: Virtqueue):
        """The next chain to serve; None when the queue is empty (after re-enabling
        notifications and looking once more) or when the device is being quiesced (what is
        left stays in the ring for after the snapshot)."""
        while not self.quiescing:
            chain = q.pop()
            if chain is not None:
                return chain
            if not q.enable_notifications():
                return None
        return None

    def _poll(self, q: Virtqueue) -> None:
        """Busy-poll the available ring for `poll_us` after a drain before going back to
        sleep on the ioeventfd: a guest that keeps a queue busy then hands over new requests
        without a notify and without a wake-up of this thread (each costs tens of µs on
        nested hosts; vhost's busy polling, Linux io_poll)."""
        deadline = time.perf_counter() + self.poll_us * 1e-6
        while time.perf_counter() < deadline and not self.quiescing:
            if q.pending():
                self.polled += 1
                self.handle(q)
                deadline = time.perf_counter() + self.poll_us * 1e-6

    def signal_used(self, q: Virtqueue) -> None:
        """Interrupt the driver for what was pushed on `q`, unless it asked us not to."""
        if q.needs_interrupt() and self.transport is not None:
            self.interrupts += 1
            self.transport.interrupt(INT_USED_BUFFER, q)

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & STATUS_DRIVER_OK and self.transport is not None:
            self.transport.interrupt(INT_CONFIG_CHANGE, None)

    # --- ioeventfds (the transport creates them; the I/O loop watches them) ----------------

    def watch(self, index: int, fd: int) -> None:
        """Serve queue `index` whenever eventfd `fd` is signalled."""
        loop = self.loop
        if loop is None:
            return
        self._watched[fd] = index

        def on_notify() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.notifies += 1
            self.process(index)

        loop.add_reader(fd, on_notify)

    def unwatch_all(self) -> None:
        if self.loop is not None:
            for fd in self._watched:
                self.loop.remove_reader(fd)
        self._watched.clear()

    # --- config space --------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        cfg = self.config_bytes()
        if offset < 0 or size <= 0 or offset + size > len(cfg):
            return bytes(size if size > 0 else 0)
        return cfg[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Device config writes (few fields are writable; the default ignores them)."""

    # --- for subclasses ------------------------------------------------------------------

    def activate(self) -> None:
        """DRIVER_OK: the device may start using its queues."""

    def handle(self, q: Virtqueue) -> None:
        """Drain `q`: pop chains, serve them, push them back, signal_used."""
        raise NotImplementedError

    def on_reset(self) -> None:
        """Drop device-specific state on reset."""

    def close(self) -> None:
        self.unwatch_all()

    # --- stats and snapshots -------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "type": self.kind,
            "notifies": self.notifies,
            "requests": self.requests,
            "interrupts": self.interrupts,
            "errors": self.errors,
            "internal_errors": self.internal_errors,
            "resets": self.resets,
            "polled": self.polled,
            "needs_reset": self.broken,
        }

    def state(self) -> dict:
        with self.lock:
            return {
                "status": self.status,
                "driver_features": self.driver_features,
                "config_generation": self.config_generation,
                "broken": self.broken,
                "queues": [q.state() for q in self.queues],
                "device": self.device_state(),
            }

    def restore_state(self, state: dict) -> None:
        assert self.memory is not None
        with self.lock:
            self.status = int(state["status"])
            self.driver_features = int(state["driver_features"]) & self.device_features
            self.config_generation = int(state["config_generation"])
            self.broken = state.get("broken")
            for q, qs in zip(self.queues, state["queues"], strict=False):
                try:
                    q.restore_state(qs, self.memory)
                except QueueError as e:
                    self.broken = self.broken or str(e)
            self.restore_device_state(state.get("device", {}))
            if self.status & STATUS_DRIVER_OK and self.transport is not None:
                self.transport.activated()
        # Requests the snapshot caught in the available ring were notified to the old device,
        # not to this one: the driver will not notify them again (it may be waiting for them
        # with a full queue). Serve what is there, as the source does after a quiesced pause.
        if self.running:
            for q in self.queues:
                if q.ready:
                    self.notify(q.index)

    def device_state(self) -> dict:
        return {}

    def restore_device_state(self, state: dict) -> None:
        pass


__all__ = [
    "COMMON_FEATURES",
    "INT_CONFIG_CHANGE",
    "INT_USED_BUFFER",
    "QueueError",
    "Transport",
    "VirtioDevice",
    "Virtqueue",
]

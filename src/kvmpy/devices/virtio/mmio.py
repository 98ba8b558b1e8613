"""virtio-mmio, version 2 register layout (VIRTIO 1.2, 4.2.2).

One 4 KiB window per device: registers below 0x100, the device's config space from 0x100.
Registers are 32-bit (4.2.2.2: the driver MUST use 32-bit accesses); any other access to
them reads as zero and writes are dropped. Config space takes any width.

QueueNotify (0x050) takes the queue index; with ioeventfd each queue gets an eventfd with
that index as its datamatch, so KVM signals the right queue's I/O thread without an exit. A
write no ioeventfd matched (no ioeventfd support, or an index that is not a queue) reaches
`write()` here, which only schedules the queue's work (or drops a bad index).

The interrupt is one line: InterruptStatus says why (bit 0 used buffer, bit 1 config change),
InterruptACK clears. Linux finds the window through `virtio_mmio.device=4K@BASE:IRQ` on its
command line (`kernel_cmdline()`); kvmpy's SDK scans the windows from the start of the MMIO
hole for the magic value.
"""

from __future__ import annotations

import struct
import threading

from ...devices import Device
from ...memory import GuestMemory
from .constants import INT_CONFIG_CHANGE, INT_USED_BUFFER, STATUS_DRIVER_OK
from .device import VirtioDevice
from .queue import Virtqueue
from .wiring import Irq, NoNotifiers, Notifiers

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x5950_4D4B  # "KMPY"
WINDOW_SIZE = 0x1000
CONFIG_OFFSET = 0x100

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC

_U32 = struct.Struct("<I")


class VirtioMmio(Device):
    """The virtio-mmio window of one device."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        irq: Irq,
        base: int = 0,
        notifiers: Notifiers | None = None,
    ):
        self.device = device
        self.name = f"virtio-mmio-{device.name}"
        self.base = base
        self.irq = irq
        #: The IOAPIC pin of `irq`, when the machine wired one (for firmware-style routing).
        self.pin: int | None = None
        self.notifiers = notifiers or NoNotifiers()
        self.interrupt_status = 0
        self._isr_lock = threading.Lock()
        self.features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._notify_fds: list[int] = []
        self._wired: set[int] = set()
        #: Notify writes that reached the VMM (no ioeventfd took them).
        self.notify_exits = 0
        device.bind(memory, self)

    def kernel_cmdline(self, irq: int) -> str:
        """The Linux command-line entry that declares this window (virtio_mmio.device=)."""
        return f"virtio_mmio.device=4K@{self.base:#x}:{irq}"

    # --- the bus -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_OFFSET:
            return self.device.read_config(offset - CONFIG_OFFSET, size)
        if size != 4 or offset % 4:
            return bytes(size)
        return _U32.pack(self._read_reg(offset))

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_OFFSET:
            self.device.write_config(offset - CONFIG_OFFSET, bytes(data))
            return None
        if len(data) != 4 or offset % 4:
            return None
        self._write_reg(offset, _U32.unpack(data)[0])
        return None

    def _queue(self) -> Virtqueue | None:
        qs = self.device.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _read_reg(self, reg: int) -> int:
        dev = self.device
        if reg == MAGIC_VALUE:
            return MAGIC
        if reg == VERSION_REG:
            return VERSION
        if reg == DEVICE_ID:
            return dev.device_id
        if reg == VENDOR:
            return VENDOR_ID
        if reg == DEVICE_FEATURES:
            return dev.device_features_word(self.features_sel)
        if reg == INTERRUPT_STATUS:
            return self.interrupt_status
        if reg == STATUS:
            return dev.status
        if reg == CONFIG_GENERATION:
            return dev.config_generation
        if reg in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # 4.2.2: no shared memory region with this ID
        q = self._queue()
        if q is None:
            return 0  # 4.2.2.1: a queue that does not exist reads as size 0, not ready
        if reg == QUEUE_NUM_MAX:
            return q.max_size
        if reg == QUEUE_READY:
            return int(q.ready)
        if reg == QUEUE_DESC_LOW:
            return q.desc_addr & 0xFFFF_FFFF
        if reg == QUEUE_DESC_HIGH:
            return q.desc_addr >> 32
        if reg == QUEUE_DRIVER_LOW:
            return q.avail_addr & 0xFFFF_FFFF
        if reg == QUEUE_DRIVER_HIGH:
            return q.avail_addr >> 32
        if reg == QUEUE_DEVICE_LOW:
            return q.used_addr & 0xFFFF_FFFF
        if reg == QUEUE_DEVICE_HIGH:
            return q.used_addr >> 32
        return 0

    def _write_reg(self, reg: int, value: int) -> None:
        dev = self.device
        if reg == QUEUE_NOTIFY:
            self.notify_exits += 1
            if value < len(dev.queues):
                dev.notify(value)
            return
        if reg == DEVICE_FEATURES_SEL:
            self.features_sel = value
        elif reg == DRIVER_FEATURES:
            dev.write_driver_features_word(self.driver_features_sel, value)
        elif reg == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif reg == QUEUE_SEL:
            self.queue_sel = value
        elif reg == INTERRUPT_ACK:
            with self._isr_lock:
                self.interrupt_status &= ~value
        elif reg == STATUS:
            dev.set_status(value)
            if value == 0:
                with self._isr_lock:
                    self.interrupt_status = 0
        elif reg == SHM_SEL:
            pass
        else:
            self._write_queue_reg(reg, value)

    def _write_queue_reg(self, reg: int, value: int) -> None:
        dev = self.device
        q = self._queue()
        if q is None:
            return
        with dev.lock:
            if reg == QUEUE_READY:
                if value == 1:
                    dev.enable_queue(q)
                    if q.ready and dev.status & STATUS_DRIVER_OK:
                        self._wire(q)
                elif value == 0:
                    q.disable()  # 4.2.2.1: writing 0 stops the device using the queue
                return
            if q.ready:
                return  # 4.2.2.1: the queue's registers are fixed while it is ready
            if reg == QUEUE_NUM:
                q.set_size(value)
            elif reg == QUEUE_DESC_LOW:
                q.desc_addr = (q.desc_addr & ~0xFFFF_FFFF) | value
            elif reg == QUEUE_DESC_HIGH:
                q.desc_addr = (q.desc_addr & 0xFFFF_FFFF) | value << 32
            elif reg == QUEUE_DRIVER_LOW:
                q.avail_addr = (q.avail_addr & ~0xFFFF_FFFF) | value
            elif reg == QUEUE_DRIVER_HIGH:
                q.avail_addr = (q.avail_addr & 0xFFFF_FFFF) | value << 32
            elif reg == QUEUE_DEVICE_LOW:
                q.used_addr = (q.used_addr & ~0xFFFF_FFFF) | value
            elif reg == QUEUE_DEVICE_HIGH:
                q.used_addr = (q.used_addr & 0xFFFF_FFFF) | value << 32

    # --- Transport (called by the device, from its I/O thread) ------------------------------

    def interrupt(self, reason: int, queue: Virtqueue | None) -> None:
        with self._isr_lock:
            self.interrupt_status |= reason & (INT_USED_BUFFER | INT_CONFIG_CHANGE)
        self.irq.fire()

    def activated(self) -> None:
        for q in self.device.queues:
            if q.ready:
                self._wire(q)

    def _wire(self, q: Virtqueue) -> None:
        if q.index in self._wired:
            return
        fd = self.notifiers.add(self.base + QUEUE_NOTIFY, 4, q.index)
        self._wired.add(q.index)
        if fd is not None:
            self._notify_fds.append(fd)
            self.device.watch(q.index, fd)

    def deactivated(self) -> None:
        self.device.unwatch_all()
        for fd in self._notify_fds:
            self.notifiers.remove(fd)
        self._notify_fds.clear()
        self._wired.clear()

    def close(self) -> None:
        self.deactivated()
        self.device.close()

    # --- snapshots -----------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "transport": "mmio",
            "interrupt_status": self.interrupt_status,
            "features_sel": self.features_sel,
            "driver_features_sel": self.driver_features_sel,
            "queue_sel": self.queue_sel,
            "device": self.device.state(),
        }

    def restore_state(self, state: dict) -> None:
        self.interrupt_status = int(state.get("interrupt_status", 0)) & 3
        self.features_sel = int(state.get("features_sel", 0))
        self.driver_features_sel = int(state.get("driver_features_sel", 0))
        self.queue_sel = int(state.get("queue_sel", 0))
        self.device.restore_state(state["device"])

    def stats(self) -> dict:
        return {**self.device.stats(), "transport": "mmio", "notify_exits": self.notify_exits}

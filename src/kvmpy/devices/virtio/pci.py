"""virtio-pci, modern interface (VIRTIO 1.2, 4.1), with MSI-X and an INTx fallback.

One 32 KiB memory BAR (BAR 0) holds every structure, each named by a vendor capability:

    0x0000  common configuration (struct virtio_pci_common_cfg)
    0x1000  ISR status (1 byte, read to acknowledge)
    0x2000  device-specific configuration
    0x3000  notifications: queue i at 0x3000 + 4 * i (notify_off_multiplier 4)
    0x4000  MSI-X table (one vector per queue, plus one for configuration changes)
    0x5000  MSI-X pending bits

plus the VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.9) for drivers that reach BAR registers through
configuration space. With ioeventfd each queue's notify address has its own eventfd, wired when
the driver sets DRIVER_OK and re-wired when it moves the BAR.

Interrupts: with MSI-X enabled, each vector is an MSI of the machine's interrupt owner, routed
where the guest programmed it, or to `irq_cpu` (per device, or per queue) when the VMM chose a
vCPU; a masked vector records its pending bit and fires when unmasked. Without MSI-X, the
device raises its INTx pin and sets the ISR; reading the ISR clears both (4.1.4.5).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence

from ...memory import GuestMemory
from ..pci.config import CAP_ID_MSIX, CAP_ID_VENDOR, CMD_INTX_DISABLE, CMD_MEMORY, ConfigSpace
from .constants import INT_CONFIG_CHANGE, INT_USED_BUFFER, STATUS_DRIVER_OK
from .device import VirtioDevice
from .queue import Virtqueue
from .wiring import Irq, NoNotifiers, Notifiers

VENDOR = 0x1AF4
DEVICE_BASE = 0x1040
CLASS = {1: 0x020000, 2: 0x018000, 3: 0x078000, 4: 0x00FF00, 5: 0x05FF00, 19: 0x088000}

BAR_SIZE = 0x8000
COMMON, ISR, DEVICE_CFG, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x0, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
NOTIFY_MULTIPLIER = 4
COMMON_SIZE = 0x3C
NO_VECTOR = 0xFFFF

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
MSIX_ENABLE = 1 << 15
MSIX_MASKALL = 1 << 14

# struct virtio_pci_common_cfg field offsets
C_DFSELECT, C_DF, C_GFSELECT, C_GF = 0x00, 0x04, 0x08, 0x0C
C_MSIX, C_NUMQ, C_STATUS, C_CFGGEN = 0x10, 0x12, 0x14, 0x15
C_QSELECT, C_QSIZE, C_QMSIX, C_QENABLE, C_QNOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
C_QDESC, C_QDRIVER, C_QDEVICE, C_QNDATA, C_QRESET = 0x20, 0x28, 0x30, 0x38, 0x3A
_FIELDS = [
    (C_DFSELECT, 4), (C_DF, 4), (C_GFSELECT, 4), (C_GF, 4), (C_MSIX, 2), (C_NUMQ, 2),
    (C_STATUS, 1), (C_CFGGEN, 1), (C_QSELECT, 2), (C_QSIZE, 2), (C_QMSIX, 2), (C_QENABLE, 2),
    (C_QNOFF, 2), (C_QDESC, 8), (C_QDRIVER, 8), (C_QDEVICE, 8), (C_QNDATA, 2), (C_QRESET, 2),
]  # fmt: skip
_FIELD_AT = dict(_FIELDS)


class VirtioPci:
    """A virtio device as a PCI function (plug it into a `PciHost`)."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        vectors: Callable[[int, int | None], Irq] | None,
        intx: Irq | None = None,
        notifiers: Notifiers | None = None,
        irq_cpu: int | Sequence[int | None] | None = None,
        intx_pin: int = 1,
        intx_line: int = 0,
    ):
        self.device = device
        self.name = f"virtio-pci-{device.name}"
        nq = len(device.queues)
        self.nvectors = nq + 1
        self.intx = intx
        self.notifiers = notifiers or NoNotifiers()
        cpus = irq_cpu if isinstance(irq_cpu, Sequence) else [irq_cpu] * self.nvectors
        cpus = [*cpus, *[None] * self.nvectors][: self.nvectors]
        # Vector i < nq serves queue i when the guest chooses so; irq_cpu per queue applies
        # to the vector of the same number, the last one (config) to the device's default.
        self.vectors = [vectors(i, cpus[i]) for i in range(self.nvectors)] if vectors else []
        self.msix = bytearray(16 * self.nvectors)
        for i in range(self.nvectors):
            struct.pack_into("<I", self.msix, 16 * i + 12, 1)  # masked at reset (PCI 6.8.2.9)
        self.pba = bytearray(8 * ((self.nvectors + 63) // 64))
        self._lock = threading.Lock()
        self.isr = 0
        self.dfselect = self.gfselect = 0
        self.config_vector = NO_VECTOR
        self.queue_sel = 0
        self.notify_exits = 0
        self._notify_fds: list[int] = []
        self._bar_base = 0

        cfg = self.config = ConfigSpace(
            VENDOR, DEVICE_BASE + device.device_id, CLASS.get(device.device_id, 0xFF0000),
            revision=1, subsys_vendor=VENDOR, subsys_id=0x40 + device.device_id,
        )  # fmt: skip
        cfg.add_bar(0, BAR_SIZE)
        cfg.set_interrupt_pin(intx_pin if intx is not None else 0, intx_line)
        self._vcap(CAP_COMMON, COMMON, COMMON_SIZE)
        self._vcap(CAP_NOTIFY, NOTIFY, NOTIFY_MULTIPLIER * max(1, nq),
                   struct.pack("<I", NOTIFY_MULTIPLIER))  # fmt: skip
        self._vcap(CAP_ISR, ISR, 1)
        dev_cfg_len = len(device.config_bytes())
        if dev_cfg_len:
            self._vcap(CAP_DEVICE, DEVICE_CFG, dev_cfg_len)
        # VIRTIO_PCI_CAP_PCI_CFG: bar (1 byte), offset and length (4 each), data (4) writable.
        body = struct.pack("<BBBBxxII", 20, CAP_PCI_CFG, 0, 0, 0, 0) + bytes(4)
        mask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + b"\xff" * 4
        self._pcicfg = cfg.add_capability(CAP_ID_VENDOR, body, mask, self._pci_cfg_write)
        if self.vectors:
            msix = struct.pack("<HII", self.nvectors - 1, MSIX_TABLE, MSIX_PBA)
            self._msix_cap = cfg.add_capability(
                CAP_ID_MSIX, msix, bytes([0, MSIX_ENABLE >> 8 | MSIX_MASKALL >> 8]) + bytes(8),
                self._msix_ctl_write,
            )  # fmt: skip
        else:
            self._msix_cap = None
        cfg.on_bar_moved = lambda bar, addr: self._rewire()
        cfg.on_command = lambda old: self._rewire()
        device.bind(memory, self)

    def _vcap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> None:
        body = struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, 0, 0, offset, length) + extra
        self.config.add_capability(CAP_ID_VENDOR, body)

    # --- MSI-X ---------------------------------------------------------------------------

    @property
    def msix_control(self) -> int:
        if self._msix_cap is None:
            return 0
        return self.config.u16(self._msix_cap + 2)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_control & MSIX_ENABLE)

    def _entry(self, i: int) -> tuple[int, int, bool]:
        lo, hi, data, ctl = struct.unpack_from("<IIII", self.msix, 16 * i)
        return lo | hi << 32, data, bool(ctl & 1)

    def _masked(self, i: int) -> bool:
        return bool(self.msix_control & MSIX_MASKALL) or self._entry(i)[2]

    def _msix_ctl_write(self, off: int, size: int) -> None:
        self._deliver_pending()

    def _deliver_pending(self) -> None:
        if not self.msix_enabled:
            return
        for i in range(self.nvectors):
            if self.pba[i // 8] & (1 << (i % 8)) and not self._masked(i):
                self.pba[i // 8] &= ~(1 << (i % 8))
                self._fire(i)

    def _fire(self, i: int) -> None:
        self.vectors[i].fire()

    def _table_write(self, off: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or off % size or off + size > len(self.msix):
            return
        i = off // 16
        was_masked = self._entry(i)[2]
        self.msix[off : off + size] = data
        addr, msg, masked = self._entry(i)
        if not masked:
            configure = getattr(self.vectors[i], "configure", None)
            if configure is not None and (was_masked or off % 16 < 12):
                configure(addr, msg)
            if was_masked:
                self._deliver_pending()

    # --- interrupts (Transport, from the I/O thread) ---------------------------------------

    def interrupt(self, reason: int, queue: Virtqueue | None) -> None:
        if self.msix_enabled:
            vec = self.config_vector if queue is None else queue.msix_vector
            if vec >= self.nvectors:
                return  # NO_VECTOR: the driver wants no interrupt for this
            with self._lock:
                if self._masked(vec):
                    self.pba[vec // 8] |= 1 << (vec % 8)
                    return
            self._fire(vec)
            return
        with self._lock:
            self.isr |= reason & (INT_USED_BUFFER | INT_CONFIG_CHANGE)
        if self.intx is not None and not self.config.command & CMD_INTX_DISABLE:
            self.intx.set_level(True)

    def read_isr(self) -> int:
        with self._lock:
            v, self.isr = self.isr, 0
        if v and self.intx is not None:
            self.intx.set_level(False)
        return v

    # --- notifications ---------------------------------------------------------------------

    def activated(self) -> None:
        self._rewire()

    def deactivated(self) -> None:
        self.device.unwatch_all()
        for fd in self._notify_fds:
            self.notifiers.remove(fd)
        self._notify_fds.clear()
        self._bar_base = 0

    def _rewire(self, force: bool = False) -> None:
        """(Re)create the notify ioeventfds at the BAR's current address."""
        dev = self.device
        base = self.config.bar_address(0)
        decoding = bool(self.config.command & CMD_MEMORY)
        want = base if (dev.status & STATUS_DRIVER_OK and decoding and base) else 0
        if want == self._bar_base and not force:
            return
        self.deactivated()
        if not want:
            return
        self._bar_base = want
        for q in dev.queues:
            if q.ready:
                fd = self.notifiers.add(want + NOTIFY + NOTIFY_MULTIPLIER * q.index, 2, None)
                if fd is not None:
                    self._notify_fds.append(fd)
                    dev.watch(q.index, fd)

    # --- the BAR ---------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar != 0 or size not in (1, 2, 4, 8) or offset + size > BAR_SIZE:
            return b"\xff" * max(0, min(size, 8))
        if offset < COMMON + COMMON_SIZE:
            return self._common_bytes()[offset : offset + size].ljust(size, b"\0")
        if offset == ISR and size == 1:
            return bytes([self.read_isr()])
        if DEVICE_CFG <= offset < NOTIFY:
            return self.device.read_config(offset - DEVICE_CFG, size)
        if MSIX_TABLE <= offset < MSIX_TABLE + len(self.msix) and size in (4, 8):
            o = offset - MSIX_TABLE
            if o % size == 0 and o + size <= len(self.msix):
                return bytes(self.msix[o : o + size])
        if MSIX_PBA <= offset < MSIX_PBA + len(self.pba) and size in (4, 8):
            o = offset - MSIX_PBA
            if o % size == 0 and o + size <= len(self.pba):
                return bytes(self.pba[o : o + size])
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        size = len(data)
        if bar != 0 or size not in (1, 2, 4, 8) or offset + size > BAR_SIZE:
            return
        if offset < COMMON + COMMON_SIZE:
            self._common_write(offset, data)
        elif NOTIFY <= offset < NOTIFY + NOTIFY_MULTIPLIER * len(self.device.queues):
            if (offset - NOTIFY) % NOTIFY_MULTIPLIER == 0:
                self.notify_exits += 1
                self.device.notify((offset - NOTIFY) // NOTIFY_MULTIPLIER)
        elif DEVICE_CFG <= offset < NOTIFY:
            self.device.write_config(offset - DEVICE_CFG, data)
        elif MSIX_TABLE <= offset < MSIX_TABLE + len(self.msix):
            with self._lock:
                self._table_write(offset - MSIX_TABLE, data)

    # --- common configuration ----------------------------------------------------------------

    def _queue(self) -> Virtqueue | None:
        qs = self.device.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _common_bytes(self) -> bytes:
        dev = self.device
        q = self._queue()
        return struct.pack(
            "<IIIIHHBBHHHHHQQQHH",
            self.dfselect,
            dev.device_features_word(self.dfselect),
            self.gfselect,
            (dev.driver_features >> (32 * self.gfselect)) & 0xFFFF_FFFF if self.gfselect < 2 else 0,
            self.config_vector,
            len(dev.queues),
            dev.status,
            dev.config_generation,
            self.queue_sel,
            q.size if q else 0,
            q.msix_vector if q else NO_VECTOR,
            int(q.ready) if q else 0,
            q.index if q else 0,
            q.desc_addr if q else 0,
            q.avail_addr if q else 0,
            q.used_addr if q else 0,
            q.index if q else 0,
            0,
        )

    def _common_write(self, offset: int, data: bytes) -> None:
        size = _FIELD_AT.get(offset)
        if size == len(data):  # the usual case: one whole field
            self._set_field(offset, int.from_bytes(data, "little"))
            return
        # Part of a field or across fields (a 64-bit address as two dwords, odd guests):
        # merge into the current values.
        cur = bytearray(self._common_bytes())
        end = min(offset + len(data), COMMON_SIZE)
        cur[offset:end] = data[: end - offset]
        for foff, fsize in _FIELDS:
            if offset < foff + fsize and foff < end:
                value = int.from_bytes(cur[foff : foff + fsize], "little")
                self._set_field(foff, value)

    def _set_field(self, field: int, value: int) -> None:
        dev = self.device
        if field == C_DFSELECT:
            self.dfselect = value
        elif field == C_GFSELECT:
            self.gfselect = value
        elif field == C_GF:
            dev.write_driver_features_word(self.gfselect, value)
        elif field == C_MSIX:
            self.config_vector = value if value < self.nvectors else NO_VECTOR
        elif field == C_STATUS:
            dev.set_status(value)
            if value == 0:
                with self._lock:
                    self.isr = 0
                self.config_vector = NO_VECTOR
                if self.intx is not None:
                    self.intx.set_level(False)
        elif field == C_QSELECT:
            self.queue_sel = value
        else:
            q = self._queue()
            if q is None:
                return
            with dev.lock:
                if field == C_QMSIX:
                    q.msix_vector = value if value < self.nvectors else NO_VECTOR
                elif field == C_QENABLE:
                    if value == 1 and not q.ready:
                        dev.enable_queue(q)
                        if q.ready and dev.status & STATUS_DRIVER_OK:
                            self._rewire(force=True)
                elif q.ready:
                    return  # 4.1.4.3.2: queue fields are fixed once it is enabled
                elif field == C_QSIZE:
                    q.set_size(value)
                elif field == C_QDESC:
                    q.desc_addr = value
                elif field == C_QDRIVER:
                    q.avail_addr = value
                elif field == C_QDEVICE:
                    q.used_addr = value

    # --- VIRTIO_PCI_CAP_PCI_CFG --------------------------------------------------------------

    def _pci_cfg_write(self, off: int, size: int) -> None:
        if off < 16:
            return  # bar/offset/length: just stored
        cfg, base = self.config, self._pcicfg
        bar, offset, length = cfg.u8(base + 4), cfg.u32(base + 8), cfg.u32(base + 12)
        if bar != 0 or length not in (1, 2, 4):
            return
        self.bar_write(0, offset, bytes(cfg.data[base + 16 : base + 16 + length]))

    # The read side of the window: refresh pci_cfg_data before a read reaches it.
    def config_read(self, reg: int, size: int) -> bytes:
        base = self._pcicfg
        if base + 16 <= reg < base + 20:
            cfg = self.config
            bar, offset, length = cfg.u8(base + 4), cfg.u32(base + 8), cfg.u32(base + 12)
            if bar == 0 and length in (1, 2, 4):
                cfg.data[base + 16 : base + 20] = self.bar_read(0, offset, length).ljust(4, b"\0")
        return self.config.read(reg, size)

    # --- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self.deactivated()
        self.device.close()

    def state(self) -> dict:
        return {
            "transport": "pci",
            "config": self.config.data[:256].hex(),
            "msix": self.msix.hex(),
            "pba": self.pba.hex(),
            "isr": self.isr,
            "dfselect": self.dfselect,
            "gfselect": self.gfselect,
            "config_vector": self.config_vector,
            "queue_sel": self.queue_sel,
            "device": self.device.state(),
        }

    def restore_state(self, state: dict) -> None:
        self.config.data[:256] = bytes.fromhex(state["config"])[:256].ljust(256, b"\0")
        self.msix[:] = bytes.fromhex(state["msix"])[: len(self.msix)].ljust(len(self.msix), b"\0")
        self.pba[:] = bytes.fromhex(state["pba"])[: len(self.pba)].ljust(len(self.pba), b"\0")
        self.isr = int(state["isr"]) & 3
        self.dfselect, self.gfselect = int(state["dfselect"]), int(state["gfselect"])
        self.config_vector = int(state["config_vector"])
        self.queue_sel = int(state["queue_sel"])
        for i in range(self.nvectors):
            addr, data, masked = self._entry(i)
            if not masked and hasattr(self.vectors[i] if self.vectors else None, "configure"):
                self.vectors[i].configure(addr, data)
        self.device.restore_state(state["device"])

    def stats(self) -> dict:
        return {**self.device.stats(), "transport": "pci", "notify_exits": self.notify_exits}

"""A 16550A UART (the PC's COM1 at 0x3F8, IRQ 4), as Linux's 8250 driver sees it.

Transmission is instant: a byte written to THR is output at once, so the transmitter is
always empty (LSR.THRE|TEMT) and the "THR empty" interrupt fires after every write while
enabled. Input comes from the console backend through `push_input` into a bounded queue that
stands in for the receive FIFO; the interrupt line follows IIR (QEMU's behaviour: MCR.OUT2 does
not gate it).

Linux's autoconfig probes exactly the things modelled here: IER read-back, the loopback test
(MCR.LOOP with RTS|OUT2 must read CTS|DCD in MSR), the scratch register, and FIFO detection
(FCR bit 0 makes IIR read 0xC0 in its top bits: a 16550A).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from .. import Device, InterruptLine, NoInterrupt, Output

COM1_PORT = 0x3F8
COM1_IRQ = 4
PORTS = 8

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

#: Bytes of console input held for the guest. A real 16550A holds 16; the queue is larger so
#: a pasted line is not dropped while the guest's driver catches up, and bounded so a host
#: that types faster than the guest reads cannot grow the VMM without limit.
DEFAULT_INPUT_LIMIT = 64 * 1024


class Serial16550(Device):
    name = "serial"

    def __init__(
        self, irq: InterruptLine | None = None, input_limit: int = DEFAULT_INPUT_LIMIT
    ) -> None:
        self.irq = irq or NoInterrupt()
        self.input_limit = max(1, input_limit)
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1, as firmware leaves it
        self.mcr = MCR_OUT2
        self.lsr_errors = 0  # OE/BI bits, cleared by reading LSR
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fcr = 0
        # The "THR empty" interrupt is pending until IIR reports it or THR is written.
        self.thri_pending = False
        self.msr_delta = 0
        self.irq_level = False
        #: Counters (bytes the guest wrote and read; input refused because the queue was full).
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_dropped = 0
        #: Called (in a vCPU thread) when the guest may take more input: it emptied the
        #: receive queue, or enabled the receive interrupt (its driver opened the port). The
        #: console backend refills from there instead of polling.
        self.on_input_wanted: Callable[[], None] | None = None
        # The console backend's thread pushes input while vCPU threads read the registers;
        # the interrupt line must follow one consistent state (a lost update could leave a
        # level interrupt high with nothing pending, and Linux disables a screaming IRQ).
        self._lock = threading.Lock()

    # --- the console backend's side --------------------------------------------------------------

    def push_input(self, data: bytes) -> int:
        """Queue console input for the guest; returns how many bytes were taken (the rest did
        not fit: the caller keeps them and retries after the guest read some)."""
        with self._lock:
            room = self.input_limit - len(self._rx)
            taken = data[: max(0, room)]
            self._rx.extend(taken)
            if taken:
                self._update_irq()
            return len(taken)

    @property
    def input_pending(self) -> int:
        return len(self._rx)

    def input_room(self) -> int:
        return self.input_limit - len(self._rx)

    @property
    def accepting_input(self) -> bool:
        """Whether the guest listens: its driver enabled the receive interrupt, which Linux's
        8250 driver does when a process opens the port (and not for kernel messages). Before
        that, its start-up clears the FIFO and input would be lost."""
        return bool(self.ier & IER_RDI)

    # --- registers ---------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_reg(offset & 7)
            wanted = offset & 7 == RBR_THR_DLL and not self._rx and not self.lcr & LCR_DLAB
        if wanted and self.on_input_wanted is not None:
            self.on_input_wanted()
        # A 16- or 32-bit access reads the one register (Linux never does it; be deterministic).
        return bytes([value]) + b"\xff" * (size - 1) if size > 1 else bytes([value])

    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                return self.dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self.rx_bytes += 1
            self._update_irq()
            return value
        if reg == IER_DLM:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                # Reading IIR while it reports THR empty acknowledges that interrupt.
                self.thri_pending = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT | self.lsr_errors
            if self._rx:
                lsr |= LSR_DR
            self.lsr_errors = 0
            self._update_irq()
            return lsr
        if reg == MSR:
            msr = self._modem_status() | self.msr_delta
            self.msr_delta = 0
            self._update_irq()
            return msr
        return self.scr

    def write(self, offset: int, data: bytes) -> Output | None:
        if not data:
            return None
        with self._lock:
            listening = self.accepting_input
            effect = self._write_reg(offset & 7, data[0])
            opened = not listening and self.accepting_input
        if opened and self.on_input_wanted is not None:
            self.on_input_wanted()
        return effect

    def write_string(self, offset: int, size: int, data: memoryview) -> Output | None:
        out = bytearray()
        with self._lock:
            for value in bytes(data[::size]):
                effect = self._write_reg(offset & 7, value)
                if effect is not None:
                    out += effect.data
        return Output(bytes(out)) if out else None

    def _write_reg(self, reg: int, value: int) -> Output | None:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return None
            self.tx_bytes += 1
            # Transmitted at once: THR is empty again and (if enabled) says so by interrupt.
            self.thri_pending = True
            if self.mcr & MCR_LOOP:
                self._loopback_receive(value)
                self._update_irq()
                return None
            self._update_irq()
            return Output(bytes([value]))
        if reg == IER_DLM:
            if dlab:
                self.dlm = value
                return None
            old = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRI and not old & IER_THRI:
                # Enabling the THRE interrupt with THR empty raises it at once (8250 drivers
                # start transmission this way).
                self.thri_pending = True
            self._update_irq()
            return None
        if reg == IIR_FCR:
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            self.fcr = value & 0xC9  # enable, DMA mode, trigger level; clear bits self-reset
            self._update_irq()
            return None
        if reg == LCR:
            self.lcr = value
            return None
        if reg == MCR:
            old_status = self._modem_status()
            self.mcr = value & 0x1F
            new_status = self._modem_status()
            changed = old_status ^ new_status
            if changed & MSR_CTS:
                self.msr_delta |= MSR_DCTS
            if changed & MSR_DSR:
                self.msr_delta |= MSR_DDSR
            if changed & MSR_DCD:
                self.msr_delta |= MSR_DDCD
            if old_status & MSR_RI and not new_status & MSR_RI:
                self.msr_delta |= MSR_TERI
            self._update_irq()
            return None
        if reg == SCR:
            self.scr = value
        # LSR and MSR are read-only.
        return None

    def _loopback_receive(self, value: int) -> None:
        if len(self._rx) >= self.input_limit:
            self.lsr_errors |= LSR_OE
            self.rx_dropped += 1
        else:
            self._rx.append(value)

    def _modem_status(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback wires the modem control outputs back to the status inputs.
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        # A console that is always there: carrier, data set ready and clear to send.
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _iir(self) -> int:
        """The highest-priority pending interrupt (16550 order: line status, received data,
        THR empty, modem status)."""
        ier = self.ier
        if ier & IER_RLSI and self.lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            return IIR_RDI
        if ier & IER_THRI and self.thri_pending:
            return IIR_THRI
        if ier & IER_MSI and self.msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            self.irq.set_level(level)

    # --- snapshots ---------------------------------------------------------------------------------

    def state(self) -> dict:
        with self._lock:
            return self._state()

    def _state(self) -> dict:
        return {
            "ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "lsr_errors": self.lsr_errors,
            "scr": self.scr, "dll": self.dll, "dlm": self.dlm, "fcr": self.fcr,
            "thri_pending": self.thri_pending, "msr_delta": self.msr_delta,
            "irq_level": self.irq_level, "rx": bytes(self._rx).hex(),
            "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes, "rx_dropped": self.rx_dropped,
        }  # fmt: skip

    def restore_state(self, state: dict) -> None:
        with self._lock:
            self._restore_state(state)

    def _restore_state(self, state: dict) -> None:
        for key in ("ier", "lcr", "mcr", "lsr_errors", "scr", "dll", "dlm", "fcr", "msr_delta"):
            setattr(self, key, int(state.get(key, getattr(self, key))) & 0xFF)
        self.thri_pending = bool(state.get("thri_pending", False))
        for key in ("tx_bytes", "rx_bytes", "rx_dropped"):
            setattr(self, key, int(state.get(key, 0)))
        rx = bytes.fromhex(state.get("rx", ""))[: self.input_limit]
        self._rx = deque(rx)
        # The line itself lives in the irqchip's restored state; re-derive ours from the
        # registers so the next change is an edge relative to what the chip holds.
        self.irq_level = bool(state.get("irq_level", False))
        self._update_irq()

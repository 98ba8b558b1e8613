"""An i8042 keyboard controller: enough for Linux's `reboot` (command 0xFE on port 0x64 pulses
the CPU reset line) and its i8042/atkbd drivers' probe, with scancode injection for later
(Ctrl-Alt-Del from the host). No PS/2 mouse: the AUX port reports absent.

Ports: 0x60 data, 0x64 status (read) / command (write). The keyboard interrupt is IRQ 1,
a level that follows "output buffer full" while the command byte enables it.
"""

from __future__ import annotations

from collections import deque

from .. import Device, InterruptLine, NoInterrupt, StopVm

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KBD_IRQ = 1

# Status register bits
STATUS_OBF = 0x01  # output buffer full (data for the host at 0x60)
STATUS_IBF = 0x02
STATUS_SYS = 0x04  # system flag: set after a successful self test
STATUS_CMD = 0x08  # the last write was to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX_OBF = 0x20

# Command byte (CTR) bits
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OUT = 0xD2
CMD_WRITE_AUX_OUT = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_SELF_TEST_OK = 0xAA

#: Bytes waiting for the guest at port 0x60; a bound so injected input cannot grow forever.
QUEUE_LIMIT = 256

# Set-1 scancodes for Ctrl-Alt-Del (what the controller hands over with translation on).
CTRL_ALT_DEL = bytes([0x1D, 0x38, 0x53, 0xD3, 0xB8, 0x9D])


class I8042(Device):
    """Registered on two one-port ranges; offset 0 of each. `port` tells them apart."""

    name = "i8042"

    def __init__(self, irq: InterruptLine | None = None) -> None:
        self.irq = irq or NoInterrupt()
        self.ctr = CTR_KBD_INT | CTR_SYS | CTR_XLATE | CTR_AUX_DISABLE
        self.status = STATUS_SYS | STATUS_UNLOCKED
        self._out: deque[int] = deque()
        self._pending_cmd: int | None = None  # controller command awaiting a data byte
        self._kbd_pending: int | None = None  # keyboard command awaiting a parameter
        self.output_port = 0x01  # bit 0 high: CPU not in reset
        self.irq_level = False
        self.resets = 0

    def port_device(self, port: int) -> _Port:
        return _Port(self, port)

    # --- host side ---------------------------------------------------------------------------------

    def inject_keys(self, scancodes: bytes) -> int:
        """Queue keyboard scancodes (set 1); returns how many fit."""
        room = QUEUE_LIMIT - len(self._out)
        taken = scancodes[: max(0, room)]
        self._out.extend(taken)
        self._update_irq()
        return len(taken)

    def ctrl_alt_del(self) -> int:
        return self.inject_keys(CTRL_ALT_DEL)

    # --- ports -------------------------------------------------------------------------------------

    def read_port(self, port: int) -> int:
        if port == COMMAND_PORT:
            status = self.status & ~(STATUS_OBF | STATUS_AUX_OBF)
            if self._out:
                status |= STATUS_OBF
            return status
        value = self._out.popleft() if self._out else 0
        self._update_irq()
        return value

    def write_port(self, port: int, value: int) -> StopVm | None:
        if port == COMMAND_PORT:
            self.status |= STATUS_CMD
            return self._command(value)
        self.status &= ~STATUS_CMD
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
            self.status = (self.status & ~STATUS_SYS) | (STATUS_SYS if value & CTR_SYS else 0)
            self._update_irq()
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not value & 0x01:
                return self._reset("i8042 output port")
        elif cmd == CMD_WRITE_KBD_OUT:
            self._queue(value)
        elif cmd in (CMD_WRITE_AUX_OUT, CMD_WRITE_AUX):
            pass  # no AUX device: the byte goes nowhere (Linux then decides there is no mouse)
        else:
            self._keyboard(value)
        return None

    def _command(self, cmd: int) -> StopVm | None:
        if cmd == CMD_READ_CTR:
            self._queue(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OUT, CMD_WRITE_AUX_OUT,
                     CMD_WRITE_AUX):  # fmt: skip
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self.status |= STATUS_SYS
            self._queue(0x55)
        elif cmd == CMD_KBD_TEST:
            self._queue(0x00)
        elif cmd == CMD_AUX_TEST:
            self._queue(0xFF)  # "clock line stuck low": no AUX port
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUX_DISABLE
        elif cmd == CMD_READ_OUTPUT:
            self._queue(self.output_port)
        elif cmd >= 0xF0 and not cmd & 0x01:
            # "Pulse output lines" with bit 0 low pulses the reset line; 0xFE is the usual one.
            return self._reset(f"i8042 command {cmd:#x}")
        return None

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself (an AT keyboard's command set, as atkbd probes it)."""
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None:
            self._queue(KBD_ACK)
            if pending == 0xF0 and value == 0:
                self._queue(0x02)  # "scancode set 2" (translated to set 1 by the controller)
            return
        if value in (0xED, 0xF0, 0xF3):  # LEDs, scancode set, typematic: a parameter follows
            self._kbd_pending = value
            self._queue(KBD_ACK)
        elif value == 0xF2:  # identify: an MF2 keyboard
            self._queue(KBD_ACK, 0xAB, 0x83)
        elif value == 0xFF:  # reset and self test
            self._queue(KBD_ACK, KBD_SELF_TEST_OK)
        elif value == 0xEE:  # echo
            self._queue(0xEE)
        elif value in (0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA):
            self._queue(KBD_ACK)
        else:
            self._queue(KBD_RESEND)

    def _queue(self, *values: int) -> None:
        for v in values:
            if len(self._out) < QUEUE_LIMIT:
                self._out.append(v & 0xFF)
        self._update_irq()

    def _reset(self, source: str) -> StopVm:
        self.resets += 1
        self.output_port |= 0x01
        return StopVm("reboot", f"the guest reset the machine ({source})")

    def _update_irq(self) -> None:
        level = bool(self._out) and bool(self.ctr & CTR_KBD_INT)
        if level != self.irq_level:
            self.irq_level = level
            self.irq.set_level(level)

    # --- Device API (when registered as one two-port range at 0x60 with 0x64 at offset 4) ----

    def read(self, offset: int, size: int) -> bytes:
        port = DATA_PORT + offset
        if port not in (DATA_PORT, COMMAND_PORT):
            return b"\xff" * size
        return bytes([self.read_port(port)]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> StopVm | None:
        port = DATA_PORT + offset
        if not data or port not in (DATA_PORT, COMMAND_PORT):
            return None
        return self.write_port(port, data[0])

    def state(self) -> dict:
        return {
            "ctr": self.ctr, "status": self.status, "out": bytes(self._out).hex(),
            "pending_cmd": self._pending_cmd, "kbd_pending": self._kbd_pending,
            "output_port": self.output_port, "irq_level": self.irq_level, "resets": self.resets,
        }  # fmt: skip

    def restore_state(self, state: dict) -> None:
        self.ctr = int(state.get("ctr", self.ctr)) & 0xFF
        self.status = int(state.get("status", self.status)) & 0xFF
        self._out = deque(bytes.fromhex(state.get("out", ""))[:QUEUE_LIMIT])
        pc, kp = state.get("pending_cmd"), state.get("kbd_pending")
        self._pending_cmd = int(pc) & 0xFF if pc is not None else None
        self._kbd_pending = int(kp) & 0xFF if kp is not None else None
        self.output_port = int(state.get("output_port", 1)) & 0xFF
        self.resets = int(state.get("resets", 0))
        self.irq_level = bool(state.get("irq_level", False))
        self._update_irq()


class _Port(Device):
    """One of the controller's two ports, for buses that register single ports."""

    name = "i8042"

    def __init__(self, ctl: I8042, port: int) -> None:
        self.ctl, self.port = ctl, port

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.ctl.read_port(self.port)]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> StopVm | None:
        return self.ctl.write_port(self.port, data[0]) if data else None

    # The controller's state is saved once, through its data port.
    def state(self) -> dict:
        return self.ctl.state() if self.port == DATA_PORT else {}

    def restore_state(self, state: dict) -> None:
        if self.port == DATA_PORT:
            self.ctl.restore_state(state)

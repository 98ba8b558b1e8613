"""Legacy platform devices as sans-IO models: the 16550A UART, the i8042 and the CMOS RTC,
driven the way Linux's drivers drive them, plus fuzzing of their register interfaces."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices import Output, StopVm
from kvmpy.devices.legacy import i8042 as K
from kvmpy.devices.legacy import rtc as R
from kvmpy.devices.legacy import serial as U


class Line:
    """A recording interrupt line."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []
        self.triggers = 0

    def set_level(self, level: bool) -> None:
        self.level = level
        self.changes.append(level)

    def trigger(self) -> None:
        self.triggers += 1


# --- UART ---------------------------------------------------------------------------------------


def uart():
    line = Line()
    return U.Serial16550(line, input_limit=64), line


def reg(dev, offset):
    return dev.read(offset, 1)[0]


def test_thr_write_is_output():
    u, _ = uart()
    assert u.write(U.RBR_THR_DLL, b"A") == Output(b"A")
    assert reg(u, U.LSR) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT
    assert u.tx_bytes == 1


def test_linux_autoconfig_probe_finds_a_16550a():
    u, _ = uart()
    # IER read-back test.
    u.write(U.IER_DLM, b"\x00")
    assert reg(u, U.IER_DLM) == 0
    u.write(U.IER_DLM, b"\x0f")
    assert reg(u, U.IER_DLM) == 0x0F
    u.write(U.IER_DLM, b"\x00")
    # Loopback test: RTS|OUT2 in loop mode must read back as CTS|DCD.
    u.write(U.MCR, bytes([U.MCR_LOOP | 0x0A]))
    assert reg(u, U.MSR) & 0xF0 == 0x90
    # Scratch register.
    u.write(U.SCR, b"\xa5")
    assert reg(u, U.SCR) == 0xA5
    # FIFO detection: FCR bit 0 makes IIR's top bits read 11.
    u.write(U.IIR_FCR, b"\x01")
    assert reg(u, U.IIR_FCR) & 0xC0 == 0xC0


def test_divisor_latch():
    u, _ = uart()
    u.write(U.LCR, bytes([U.LCR_DLAB | 3]))
    u.write(U.RBR_THR_DLL, b"\x01")
    u.write(U.IER_DLM, b"\x00")
    assert reg(u, U.RBR_THR_DLL) == 1 and reg(u, U.IER_DLM) == 0
    assert u.tx_bytes == 0  # a DLL write is not a transmit
    u.write(U.LCR, b"\x03")
    assert reg(u, U.IER_DLM) == 0  # IER untouched


def test_thre_interrupt_protocol():
    u, line = uart()
    u.write(U.IER_DLM, bytes([U.IER_THRI]))  # enabling with THR empty raises it
    assert line.level
    assert reg(u, U.IIR_FCR) & 0x0F == U.IIR_THRI  # reading IIR acknowledges it
    assert not line.level
    assert reg(u, U.IIR_FCR) & 0x0F == U.IIR_NO_INT
    u.write(U.RBR_THR_DLL, b"x")  # a transmit empties THR again: a new interrupt
    assert line.level
    u.write(U.IER_DLM, b"\x00")
    assert not line.level


def test_input_raises_rx_interrupt_and_reads_in_order():
    u, line = uart()
    u.write(U.IER_DLM, bytes([U.IER_RDI]))
    assert u.push_input(b"ls\n") == 3
    assert line.level
    assert reg(u, U.IIR_FCR) & 0x0F == U.IIR_RDI
    assert reg(u, U.LSR) & U.LSR_DR
    assert bytes(reg(u, U.RBR_THR_DLL) for _ in range(3)) == b"ls\n"
    assert not reg(u, U.LSR) & U.LSR_DR
    assert not line.level
    assert reg(u, U.RBR_THR_DLL) == 0  # empty reads as 0


def test_input_queue_is_bounded():
    u, _ = uart()
    assert u.push_input(b"x" * 100) == 64
    assert u.push_input(b"y") == 0
    assert u.input_pending == 64


def test_loopback_transmit_is_received():
    u, _ = uart()
    u.write(U.MCR, bytes([U.MCR_LOOP]))
    assert u.write(U.RBR_THR_DLL, b"Z") is None
    assert reg(u, U.RBR_THR_DLL) == ord("Z")


def test_rx_priority_over_thre():
    u, _ = uart()
    u.write(U.IER_DLM, bytes([U.IER_RDI | U.IER_THRI]))
    u.push_input(b"a")
    assert reg(u, U.IIR_FCR) & 0x0F == U.IIR_RDI


def test_write_string_batches():
    u, _ = uart()
    assert u.write_string(0, 1, memoryview(b"hello")) == Output(b"hello")


def test_uart_state_roundtrip():
    u, _ = uart()
    u.write(U.IER_DLM, bytes([U.IER_RDI]))
    u.write(U.SCR, b"\x42")
    u.push_input(b"abc")
    v, line = uart()
    v.restore_state(u.state())
    assert reg(v, U.SCR) == 0x42 and v.input_pending == 3 and v.irq_level
    # The line's level lives in the restored irqchip: restoring does not toggle it.
    assert line.changes == []
    assert bytes(reg(v, 0) for _ in range(3)) == b"abc"


# --- i8042 ---------------------------------------------------------------------------------------


def kbc():
    line = Line()
    return K.I8042(line), line


def test_reboot_command_resets():
    k, _ = kbc()
    effect = k.write_port(K.COMMAND_PORT, 0xFE)
    assert isinstance(effect, StopVm) and effect.reason == "reboot"
    assert k.resets == 1


def test_output_port_reset_bit():
    k, _ = kbc()
    assert k.write_port(K.COMMAND_PORT, K.CMD_WRITE_OUTPUT) is None
    assert k.write_port(K.DATA_PORT, 0xFE).reason == "reboot"


def test_self_test_and_command_byte():
    k, line = kbc()
    k.write_port(K.COMMAND_PORT, K.CMD_SELF_TEST)
    assert k.read_port(K.COMMAND_PORT) & K.STATUS_OBF
    assert line.level  # CTR enables the keyboard interrupt by default
    assert k.read_port(K.DATA_PORT) == 0x55
    assert not line.level
    k.write_port(K.COMMAND_PORT, K.CMD_READ_CTR)
    ctr = k.read_port(K.DATA_PORT)
    k.write_port(K.COMMAND_PORT, K.CMD_WRITE_CTR)
    k.write_port(K.DATA_PORT, ctr & ~K.CTR_KBD_INT)
    k.write_port(K.COMMAND_PORT, K.CMD_READ_CTR)
    assert not line.level  # interrupt disabled now
    assert k.read_port(K.DATA_PORT) == ctr & ~K.CTR_KBD_INT


def test_no_aux_port():
    k, _ = kbc()
    k.write_port(K.COMMAND_PORT, K.CMD_AUX_TEST)
    assert k.read_port(K.DATA_PORT) != 0x00


def test_keyboard_commands_ack():
    k, _ = kbc()
    k.write_port(K.DATA_PORT, 0xFF)
    assert [k.read_port(K.DATA_PORT) for _ in range(2)] == [K.KBD_ACK, K.KBD_SELF_TEST_OK]
    k.write_port(K.DATA_PORT, 0xED)
    k.write_port(K.DATA_PORT, 0x07)
    assert [k.read_port(K.DATA_PORT) for _ in range(2)] == [K.KBD_ACK, K.KBD_ACK]


def test_ctrl_alt_del_injection():
    k, line = kbc()
    assert k.ctrl_alt_del() == 6
    assert line.level
    assert bytes(k.read_port(K.DATA_PORT) for _ in range(6)) == K.CTRL_ALT_DEL
    assert not line.level


def test_i8042_state_roundtrip():
    k, _ = kbc()
    k.write_port(K.COMMAND_PORT, K.CMD_WRITE_CTR)
    j, _ = kbc()
    j.restore_state(k.state())
    j.write_port(K.DATA_PORT, 0x01)  # completes the pending CTR write
    j.write_port(K.COMMAND_PORT, K.CMD_READ_CTR)
    assert j.read_port(K.DATA_PORT) == 0x01


# --- RTC -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# 2026-11-29 14:05:09 UTC, a Sunday
T0 = calendar.timegm((2026, 11, 29, 14, 5, 9))


def rtc_read(r, index):
    r.write(0, bytes([index]))
    return r.read(1, 1)[0]


def rtc_write(r, index, value):
    r.write(0, bytes([index]))
    r.write(1, bytes([value]))


def test_rtc_bcd_24h_host_time():
    r = R.CmosRtc(Clock(T0 + 0.5))
    assert rtc_read(r, R.REG_SECONDS) == 0x09
    assert rtc_read(r, R.REG_MINUTES) == 0x05
    assert rtc_read(r, R.REG_HOURS) == 0x14
    assert rtc_read(r, R.REG_DAY) == 0x29
    assert rtc_read(r, R.REG_MONTH) == 0x11
    assert rtc_read(r, R.REG_YEAR) == 0x26
    assert rtc_read(r, R.REG_CENTURY) == 0x20
    assert rtc_read(r, R.REG_WEEKDAY) == 1  # Sunday
    assert rtc_read(r, R.REG_D) & R.D_VRT
    assert not rtc_read(r, R.REG_D) & 0x40


def test_rtc_binary_12h():
    r = R.CmosRtc(Clock(T0 + 0.5))
    rtc_write(r, R.REG_B, R.B_DM_BINARY)  # binary, 12-hour
    assert rtc_read(r, R.REG_SECONDS) == 9
    assert rtc_read(r, R.REG_HOURS) == 0x80 | 2  # 2 PM


def test_rtc_update_in_progress_window():
    clock = Clock(T0 + 0.5)
    r = R.CmosRtc(clock)
    assert not rtc_read(r, R.REG_A) & R.A_UIP
    clock.t = T0 + 1 - 100e-6
    assert rtc_read(r, R.REG_A) & R.A_UIP


def test_rtc_set_time_moves_an_offset():
    clock = Clock(T0 + 0.5)
    r = R.CmosRtc(clock)
    rtc_write(r, R.REG_B, R.B_SET | R.B_24H)
    rtc_write(r, R.REG_HOURS, 0x23)
    assert rtc_read(r, R.REG_HOURS) == 0x23  # latched while SET
    rtc_write(r, R.REG_B, R.B_24H)
    clock.t += 10
    assert rtc_read(r, R.REG_HOURS) == 0x23
    assert rtc_read(r, R.REG_SECONDS) == 0x19


def test_rtc_nmi_mask_and_ram():
    r = R.CmosRtc(Clock(T0))
    r.write(0, bytes([0x80 | 0x40]))
    assert r.nmi_disabled and r.index == 0x40
    r.write(1, b"\x77")
    assert rtc_read(r, 0x40) == 0x77
    assert r.read(0, 1) == b"\xff"


def test_rtc_status_c_update_flag():
    clock = Clock(T0 + 0.1)
    r = R.CmosRtc(clock)
    rtc_read(r, R.REG_C)
    assert rtc_read(r, R.REG_C) == 0
    clock.t += 1
    assert rtc_read(r, R.REG_C) & R.C_UF


def test_rtc_state_roundtrip():
    r = R.CmosRtc(Clock(T0))
    rtc_write(r, 0x50, 0x12)
    s = R.CmosRtc(Clock(T0))
    s.restore_state(r.state())
    assert rtc_read(s, 0x50) == 0x12


# --- fuzzing the register interfaces ----------------------------------------------------------------

ACCESS = st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 4), st.integers(0, 255))


@settings(max_examples=300, deadline=None)
@given(st.lists(ACCESS, max_size=200), st.binary(max_size=200))
def test_fuzz_uart(accesses, typed):
    u, line = uart()
    u.push_input(typed)
    for is_write, offset, size, value in accesses:
        if is_write:
            effect = u.write(offset, bytes([value]) * size)
            assert effect is None or isinstance(effect, Output)
        else:
            assert len(u.read(offset, size)) == size
        assert u.input_pending <= 64
        assert line.level == (u._iir() != U.IIR_NO_INT)
    u.restore_state(u.state())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.sampled_from([0, 4]), st.integers(0, 255)), max_size=200)
)
def test_fuzz_i8042(accesses):
    k, line = kbc()
    for is_write, offset, value in accesses:
        if is_write:
            effect = k.write(offset, bytes([value]))
            assert effect is None or isinstance(effect, StopVm)
        else:
            assert len(k.read(offset, 1)) == 1
        assert len(k._out) <= K.QUEUE_LIMIT
        assert line.level == (bool(k._out) and bool(k.ctr & K.CTR_KBD_INT))
    k.restore_state(k.state())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 255)), max_size=200),
    st.floats(0, 4e9),
)
def test_fuzz_rtc(accesses, t):
    r = R.CmosRtc(Clock(t))
    for is_write, offset, value in accesses:
        if is_write:
            assert r.write(offset, bytes([value])) is None
        else:
            assert len(r.read(offset, 1)) == 1
        assert len(r.ram) == R.CMOS_SIZE
    r.restore_state(r.state())


@pytest.mark.parametrize("size", [2, 4])
def test_wide_reads_have_the_right_size(size):
    u, _ = uart()
    k, _ = kbc()
    r = R.CmosRtc(Clock(T0))
    assert len(u.read(0, size)) == size
    assert len(k.read(0, size)) == size
    assert len(r.read(1, size)) == size


def test_console_input_waits_out_the_8250_probe():
    """Linux's 8250 autoconfig sets IER to 0x0F for a moment, long before a process opens the
    port (whose start-up clears the FIFO): typed input must not go in then, only once the
    receive interrupt has stayed enabled."""
    import os
    import time
    from types import SimpleNamespace

    from kvmpy.vmm.console import RETRY_S, ConsoleInput
    from kvmpy.vmm.event_loop import EventLoop

    u, _ = uart()
    loop = EventLoop("console-test")
    r, w = os.pipe()
    loop.start()
    con = ConsoleInput(SimpleNamespace(event_loop=loop), u, r)
    try:
        con.start()
        os.write(w, b"uname -a\n")
        time.sleep(3 * RETRY_S)
        assert con.pending == 9 and u.input_pending == 0  # nobody listens yet
        u.write(U.IER_DLM, b"\x0f")  # the probe (tens of ms of emulated ring 0 here)...
        time.sleep(RETRY_S / 4)
        u.write(U.IER_DLM, b"\x00")  # ...and its restore
        time.sleep(3 * RETRY_S)
        assert u.input_pending == 0 and con.pending == 9
        u.write(U.IIR_FCR, bytes([U.FCR_CLEAR_RCVR]))  # the start-up at open...
        u.write(U.IER_DLM, bytes([U.IER_RDI]))  # ...then the receive interrupt, for good
        deadline = time.monotonic() + 5
        while u.input_pending < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bytes(reg(u, U.RBR_THR_DLL) for _ in range(9)) == b"uname -a\n"
        assert con.typed == 9
    finally:
        con.close()
        loop.stop()
        loop.close()
        os.close(r)
        os.close(w)

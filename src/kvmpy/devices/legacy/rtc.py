"""A CMOS real-time clock (Motorola MC146818, the PC's RTC at ports 0x70/0x71) showing the
host's time (UTC).

Port 0x70 selects a register (bits 0-6) and holds the NMI mask (bit 7); 0x71 reads or writes
the selected one. Time registers follow status register B: BCD or binary (DM), 12- or 24-hour
(bit 7 of the hour is PM in 12-hour mode). Status A's update-in-progress bit is set during the
last 244 µs before each second, as on the chip, so a guest that waits for it to clear (Linux's
mc146818_get_time does) sees real behaviour. Setting the clock (SET bit in B, then the time
registers) moves the guest's time by an offset from the host's; the host clock is not touched.
Registers 0x0E-0x7F are battery-backed RAM.

No periodic, alarm or update interrupts are raised (IRQ 8 is not connected); status C reports
the update-ended flag once per elapsed second when polled.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from .. import Device

INDEX_PORT = 0x70
DATA_PORT = 0x71

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32  # the PC convention (ACPI FADT's default century register)

A_UIP = 0x80
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_IRQF = 0x80
C_UF = 0x10
D_VRT = 0x80

NMI_DISABLE = 0x80
#: The update cycle: UIP is set this long before each second boundary.
UIP_WINDOW = 244e-6
CMOS_SIZE = 128

_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR,
              REG_CENTURY)  # fmt: skip


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class CmosRtc(Device):
    """Registered at INDEX_PORT with length 2 (offset 0 = index, 1 = data)."""

    name = "rtc"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.index = 0
        self.nmi_disabled = False
        #: Guest time = host time + offset (seconds), changed when the guest sets the clock.
        self.offset = 0.0
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate (firmware default)
        self.ram[REG_B] = B_24H  # BCD, 24-hour: what PC firmware leaves
        self.ram[REG_D] = D_VRT
        self._latched: dict[int, int] | None = None  # time registers while SET is on
        self._last_second = int(self._now())

    def _now(self) -> float:
        return self.clock() + self.offset

    # --- time registers ----------------------------------------------------------------------------

    def _fields(self, t: float) -> dict[int, int]:
        tm = time.gmtime(int(t))
        return {
            REG_SECONDS: tm.tm_sec,
            REG_MINUTES: tm.tm_min,
            REG_HOURS: tm.tm_hour,
            REG_WEEKDAY: (tm.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            REG_DAY: tm.tm_mday,
            REG_MONTH: tm.tm_mon,
            REG_YEAR: tm.tm_year % 100,
            REG_CENTURY: tm.tm_year // 100,
        }

    def _encode(self, reg: int, value: int) -> int:
        b = self.ram[REG_B]
        pm = 0
        if reg == REG_HOURS and not b & B_24H:
            pm = 0x80 if value >= 12 else 0
            value = value % 12 or 12
        return (value if b & B_DM_BINARY else _bcd(value)) | pm

    def _decode(self, reg: int, raw: int) -> int:
        b = self.ram[REG_B]
        pm = False
        if reg == REG_HOURS and not b & B_24H:
            pm = bool(raw & 0x80)
            raw &= 0x7F
        value = raw if b & B_DM_BINARY else _from_bcd(raw)
        if reg == REG_HOURS and not b & B_24H:
            value = (value % 12) + (12 if pm else 0)
        return value

    def _read_time(self, reg: int) -> int:
        fields = self._latched if self._latched is not None else self._fields(self._now())
        return self._encode(reg, fields[reg])

    def _commit_latched(self) -> None:
        f = self._latched
        assert f is not None
        try:
            year = f[REG_CENTURY] * 100 + f[REG_YEAR]
            when = calendar.timegm(
                (year, f[REG_MONTH], f[REG_DAY], f[REG_HOURS], f[REG_MINUTES], f[REG_SECONDS])
            )
        except (ValueError, OverflowError):
            return  # an impossible date: keep the old time, as a chip would keep counting
        if f[REG_MONTH] not in range(1, 13) or f[REG_DAY] not in range(1, 32):
            return
        self.offset = when - self.clock()

    # --- ports -------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            return b"\xff" * size  # the index register is write-only
        return bytes([self.read_data()]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return None
        if offset == 0:
            self.index = data[0] & 0x7F
            self.nmi_disabled = bool(data[0] & NMI_DISABLE)
        else:
            self.write_data(data[0])
        return None

    def read_data(self) -> int:
        reg = self.index
        if reg in _TIME_REGS:
            return self._read_time(reg)
        if reg == REG_A:
            now = self._now()
            uip = A_UIP if self._latched is None and now % 1.0 >= 1.0 - UIP_WINDOW else 0
            return (self.ram[REG_A] & 0x7F) | uip
        if reg == REG_C:
            # Update-ended flag: a second has passed since the last read of C.
            second = int(self._now())
            value = 0
            if second != self._last_second:
                self._last_second = second
                value = C_UF | (C_IRQF if self.ram[REG_B] & B_UIE else 0)
            return value
        if reg == REG_D:
            return D_VRT
        return self.ram[reg]

    def write_data(self, value: int) -> None:
        reg = self.index
        if reg in _TIME_REGS:
            if self._latched is None:
                # Without SET the chip would overwrite the field at the next update: model the
                # write as setting the clock, as Linux only writes with SET on anyway.
                self._latched = self._fields(self._now())
                self._latched[reg] = self._decode(reg, value)
                self._commit_latched()
                self._latched = None
            else:
                self._latched[reg] = self._decode(reg, value)
            return
        if reg == REG_B:
            old = self.ram[REG_B]
            if value & B_SET and not old & B_SET:
                self._latched = self._fields(self._now())
            self.ram[REG_B] = value
            if old & B_SET and not value & B_SET and self._latched is not None:
                self._commit_latched()
                self._latched = None
            return
        if reg in (REG_C, REG_D):
            return  # read-only
        if reg == REG_A:
            value &= 0x7F  # UIP is read-only
        self.ram[reg] = value

    # --- snapshots ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "index": self.index,
            "nmi_disabled": self.nmi_disabled,
            "offset": self.offset,
            "ram": bytes(self.ram).hex(),
            "latched": {str(k): v for k, v in self._latched.items()} if self._latched else None,
        }

    def restore_state(self, state: dict) -> None:
        self.index = int(state.get("index", 0)) & 0x7F
        self.nmi_disabled = bool(state.get("nmi_disabled", False))
        self.offset = float(state.get("offset", 0.0))
        ram = bytes.fromhex(state.get("ram", ""))
        if len(ram) == CMOS_SIZE:
            self.ram[:] = ram
        latched = state.get("latched")
        self._latched = {int(k): int(v) for k, v in latched.items()} if latched else None

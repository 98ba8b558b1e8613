"""The inter-VM ABI: guest-physical layout, ports, the info page and the shared region.

Mirrors src/kvmpy/guest/include/kvmpy/ipc.h (tests/test_ipc_layout.py compiles the header and
compares). Nothing here touches KVM: these are the numbers both sides agree on and the
arithmetic on them (where the rings go for a given region size, the benchmark pattern and its
checksum in closed form).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import ConfigError
from ..memory import PAGE_SIZE, format_size

INFO_GPA = 0x4000_0000
INFO_SIZE = 0x1_0000
SHM_GPA = 0x4020_0000
#: Guest RAM must end below the info page.
MAX_GUEST_RAM = INFO_GPA

PORT_DATA = 0x600
PORT_FLUSH = 0x604
PORT_SYNC = 0x608
PORT_DOORBELL = 0x60C

VECTOR_BASE = 0x40
MAX_VECTORS = 4
VEC_DATA = 0
VEC_SPACE = 1
#: `int3` is the CPL3 guest's "sleep until an interrupt" (see ipc.h).
WAIT_GATE_VECTOR = 3

MAGIC = 0x3143504959504D4B
VERSION = 1
EPROTO = 71
EINVAL = 22

#: The shared region: one page of header, two ring control blocks, then the two data areas.
SHM_HEADER_SIZE = PAGE_SIZE
RING_CTL_SIZE = 256
RING_HEAD, RING_NOTIFY_TSC, RING_TAIL, RING_SPACE_TSC, RING_CONSUMER_READY = 0, 8, 64, 72, 80
RING_CONSUMER_WAITING, RING_PRODUCER_WAITING = 128, 192
MIN_SHM_SIZE = 4 * PAGE_SIZE
MAX_SHM_SIZE = 1 << 30

PATTERN_STEP = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


class Mechanism(enum.Enum):
    PIO = ("pio", 1)
    SHM_POLL = ("shm-poll", 2)
    SHM_IRQ = ("shm-irq", 3)

    def __init__(self, label: str, code: int):
        self.label = label
        self.code = code

    @property
    def shared_memory(self) -> bool:
        return self is not Mechanism.PIO

    @classmethod
    def parse(cls, text: str) -> Mechanism:
        for m in cls:
            if m.label == text:
                return m
        names = ", ".join(m.label for m in cls)
        raise ConfigError(f"unknown mechanism {text!r}: choose one of {names}")


class Role(enum.IntEnum):
    SENDER = 0
    RECEIVER = 1


class PioWidth(enum.IntEnum):
    STRING = 0
    BYTE = 1
    DWORD = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> PioWidth:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ConfigError(f"unknown pio width {text!r}: choose byte, dword or string") from None


class WaitMode(enum.IntEnum):
    BLOCK = 0
    SPIN = 1

    @classmethod
    def parse(cls, text: str) -> WaitMode:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ConfigError(f"unknown wait mode {text!r}: choose block or spin") from None


# --- the info page -----------------------------------------------------------------------------

# Offsets into struct kvmpy_ipc_info.
INFO_PARAMS = struct.Struct("<QIIIIIIIIQIIQQQQQQQQI")  # magic .. seed, irq_cpu, at 0
INFO_IRQ_TOTAL = 0x100
INFO_IRQ_COUNT = 0x108
INFO_IRQ_LAST_TSC = 0x128
#: u32: the vCPU (its index, from the per-CPU block at %gs:0) that took the last doorbell.
INFO_IRQ_LAST_CPU = 0x130
INFO_PROGRESS = 0x140
INFO_FIRST_TOUCH = 0x148
INFO_RUNS_DONE = 0x150
INFO_ERROR = 0x158
INFO_RUNS = 0x200
RUN_RECORD = struct.Struct("<16Q")
RUN_FIELDS = (
    "t_start", "t_end", "bytes", "mismatches", "csum_a", "csum_b", "waits", "wait_tsc",
    "blocks", "doorbells", "doorbell_tsc", "io_tsc", "work_tsc", "irq_lat_tsc", "irq_lat_n",
    "wake_tsc",
)  # fmt: skip
MAX_RUNS = 32
SAMPLES_OFFSET = 0x2000
MAX_SAMPLES = (INFO_SIZE - SAMPLES_OFFSET) // 8


@dataclass(frozen=True)
class InfoParams:
    """What the VMM tells its guest (the first part of the info page)."""

    mechanism: Mechanism
    peer_id: int
    peer: int
    role: Role
    pio_width: PioWidth = PioWidth.STRING
    wait_mode: WaitMode = WaitMode.BLOCK
    vectors: int = 2
    size: int = 0
    runs: int = 1
    pingpong: int = 0
    tsc_khz: int = 0
    shm_size: int = 0
    tx_ring: int = 0
    tx_data: int = 0
    rx_ring: int = 0
    rx_data: int = 0
    ring_size: int = 0
    seed: int = 0
    irq_cpu: int = 0

    def pack(self) -> bytes:
        return INFO_PARAMS.pack(
            MAGIC, VERSION, self.mechanism.code, self.peer_id, self.peer, int(self.role),
            int(self.pio_width), int(self.wait_mode), self.vectors, self.size, self.runs,
            self.pingpong, self.tsc_khz, self.shm_size, self.tx_ring, self.tx_data,
            self.rx_ring, self.rx_data, self.ring_size, self.seed, self.irq_cpu,
        )  # fmt: skip


def unpack_run(raw: bytes | memoryview) -> dict[str, int]:
    return dict(zip(RUN_FIELDS, RUN_RECORD.unpack(raw), strict=True))


# --- the shared region -------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedLayout:
    """Where the two rings of a shared region of `size` bytes go: ring 0 carries peer 0's
    bytes to peer 1, ring 1 the other way. Each data area is the largest power of two that
    lets both fit after the header page."""

    size: int
    ring_size: int

    @classmethod
    def for_size(cls, size: int) -> SharedLayout:
        if size % PAGE_SIZE or not MIN_SHM_SIZE <= size <= MAX_SHM_SIZE:
            raise ConfigError(
                f"the shared region must be a multiple of 4K between {format_size(MIN_SHM_SIZE)}"
                f" and {format_size(MAX_SHM_SIZE)} (got {size})"
            )
        room = (size - SHM_HEADER_SIZE) // 2
        ring = 1 << (room.bit_length() - 1)
        return cls(size, ring)

    def ring_ctl(self, ring: int) -> int:
        return SHM_HEADER_SIZE - 2 * RING_CTL_SIZE + ring * RING_CTL_SIZE

    def ring_data(self, ring: int) -> int:
        return SHM_HEADER_SIZE + ring * self.ring_size

    def rings_for(self, peer_id: int) -> tuple[int, int, int, int]:
        """(tx_ring, tx_data, rx_ring, rx_data) offsets for peer 0 or 1."""
        tx, rx = (0, 1) if peer_id == 0 else (1, 0)
        return self.ring_ctl(tx), self.ring_data(tx), self.ring_ctl(rx), self.ring_data(rx)


SHM_HEADER = struct.Struct("<QIIQQ")  # magic, version, peers, size, ring_size


# --- the benchmark pattern (kvmpy_pattern in ipc.h) --------------------------------------------


def pattern_first(seed: int) -> int:
    return (seed * 0xD6E8FEB86659FD93 + 0x0123456789ABCDEF) & MASK64


def pattern_bytes(size: int, seed: int, offset: int = 0) -> bytes:
    """Bytes [offset, offset + size) of the stream (for tests and small messages)."""
    first = offset // 8
    last = (offset + size + 7) // 8
    w0 = pattern_first(seed)
    words = b"".join(
        struct.pack("<Q", (w0 + i * PATTERN_STEP) & MASK64) for i in range(first, last)
    )
    start = offset - first * 8
    return words[start : start + size]


def pattern_checksum(size: int, seed: int) -> tuple[int, int]:
    """The receiver's Fletcher sums (a, b) over `size` bytes of the stream, in closed form:
    with w_i = w0 + i*K over n whole words, a = sum w_i and b = sum of the prefix sums; a
    trailing partial word counts as one more word, zero-padded."""
    n, tail = divmod(size, 8)
    w0, k = pattern_first(seed), PATTERN_STEP
    a = n * w0 + k * (n * (n - 1) // 2)
    b = w0 * (n * (n + 1) // 2) + k * ((n - 1) * n * (n + 1) // 6)
    if tail:
        w = (w0 + n * k) & MASK64
        a += w & ((1 << (8 * tail)) - 1)
        b += a
    return a & MASK64, b & MASK64

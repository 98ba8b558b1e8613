"""The ipc ABI: kvmpy/ipc.h and kvmpy.ipc.layout agree, and the pattern's closed forms hold."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.errors import ConfigError
from kvmpy.ipc import layout as L
from kvmpy.sdk import INCLUDE_DIR

CHECKS = {
    "KVMPY_IPC_INFO_GPA": L.INFO_GPA,
    "KVMPY_IPC_INFO_SIZE": L.INFO_SIZE,
    "KVMPY_IPC_SHM_GPA": L.SHM_GPA,
    "KVMPY_IPC_PORT_DATA": L.PORT_DATA,
    "KVMPY_IPC_PORT_FLUSH": L.PORT_FLUSH,
    "KVMPY_IPC_PORT_SYNC": L.PORT_SYNC,
    "KVMPY_IPC_PORT_DOORBELL": L.PORT_DOORBELL,
    "KVMPY_IPC_VECTOR_BASE": L.VECTOR_BASE,
    "KVMPY_IPC_MAX_VECTORS": L.MAX_VECTORS,
    "KVMPY_IPC_VEC_DATA": L.VEC_DATA,
    "KVMPY_IPC_VEC_SPACE": L.VEC_SPACE,
    "KVMPY_IPC_MAGIC": L.MAGIC,
    "KVMPY_IPC_VERSION": L.VERSION,
    "KVMPY_EPROTO": L.EPROTO,
    "KVMPY_IPC_PIO": L.Mechanism.PIO.code,
    "KVMPY_IPC_SHM_POLL": L.Mechanism.SHM_POLL.code,
    "KVMPY_IPC_SHM_IRQ": L.Mechanism.SHM_IRQ.code,
    "KVMPY_PIO_STRING": L.PioWidth.STRING,
    "KVMPY_PIO_BYTE": L.PioWidth.BYTE,
    "KVMPY_PIO_DWORD": L.PioWidth.DWORD,
    "KVMPY_WAIT_BLOCK": L.WaitMode.BLOCK,
    "KVMPY_WAIT_SPIN": L.WaitMode.SPIN,
    "KVMPY_IPC_MAX_RUNS": L.MAX_RUNS,
    "KVMPY_IPC_SAMPLES_OFFSET": L.SAMPLES_OFFSET,
    "KVMPY_IPC_MAX_SAMPLES": L.MAX_SAMPLES,
    "KVMPY_PATTERN_STEP": L.PATTERN_STEP,
    "sizeof(struct kvmpy_ipc_run)": L.RUN_RECORD.size,
    "offsetof(struct kvmpy_ipc_info, irq_total)": L.INFO_IRQ_TOTAL,
    "offsetof(struct kvmpy_ipc_info, irq_count)": L.INFO_IRQ_COUNT,
    "offsetof(struct kvmpy_ipc_info, irq_last_tsc)": L.INFO_IRQ_LAST_TSC,
    "offsetof(struct kvmpy_ipc_info, progress)": L.INFO_PROGRESS,
    "offsetof(struct kvmpy_ipc_info, first_touch_tsc)": L.INFO_FIRST_TOUCH,
    "offsetof(struct kvmpy_ipc_info, runs_done)": L.INFO_RUNS_DONE,
    "offsetof(struct kvmpy_ipc_info, error)": L.INFO_ERROR,
    "offsetof(struct kvmpy_ipc_info, run)": L.INFO_RUNS,
    "offsetof(struct kvmpy_ipc_info, irq_cpu) + 4": L.INFO_PARAMS.size,
    "offsetof(struct kvmpy_ipc_info, irq_cpu)": L.INFO_PARAMS.size - 4,
    "sizeof(struct kvmpy_ring)": L.RING_CTL_SIZE,
    "offsetof(struct kvmpy_ring, head)": L.RING_HEAD,
    "offsetof(struct kvmpy_ring, notify_tsc)": L.RING_NOTIFY_TSC,
    "offsetof(struct kvmpy_ring, tail)": L.RING_TAIL,
    "offsetof(struct kvmpy_ring, space_tsc)": L.RING_SPACE_TSC,
    "offsetof(struct kvmpy_ring, consumer_ready)": L.RING_CONSUMER_READY,
    "offsetof(struct kvmpy_ring, consumer_waiting)": L.RING_CONSUMER_WAITING,
    "offsetof(struct kvmpy_ring, producer_waiting)": L.RING_PRODUCER_WAITING,
}
FIELDS = [
    "t_start", "t_end", "bytes", "mismatches", "csum_a", "csum_b", "waits", "wait_tsc", "blocks",
    "doorbells", "doorbell_tsc", "io_tsc", "work_tsc", "irq_lat_tsc", "irq_lat_n", "wake_tsc",
]  # fmt: skip


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to read the header")
def test_header_and_layout_agree(tmp_path):
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <kvmpy/ipc.h>",
        "int main(void) {",
    ]
    for expr in CHECKS:
        lines.append(f'printf("%s=%llu\\n", "{expr}", (unsigned long long)({expr}));')
    for name in FIELDS:
        lines.append(
            f'printf("run.{name}=%llu\\n", (unsigned long long)offsetof(struct kvmpy_ipc_run, {name}));'
        )
    lines += ["return 0;", "}"]
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "abi"
    subprocess.run(
        ["gcc", "-std=gnu11", f"-I{INCLUDE_DIR}", "-o", str(exe), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = dict(line.rsplit("=", 1) for line in out.splitlines())
    for expr, want in CHECKS.items():
        assert int(got[expr]) == int(want), expr
    assert [int(got[f"run.{n}"]) for n in FIELDS] == [8 * i for i in range(16)]
    assert list(L.RUN_FIELDS) == FIELDS


def test_info_params_pack_at_the_header_offsets():
    p = L.InfoParams(
        mechanism=L.Mechanism.SHM_IRQ, peer_id=3, peer=4, role=L.Role.RECEIVER,
        pio_width=L.PioWidth.DWORD, wait_mode=L.WaitMode.SPIN, vectors=2, size=12345, runs=5,
        pingpong=7, tsc_khz=2600000, shm_size=1 << 20, tx_ring=1, tx_data=2, rx_ring=3,
        rx_data=4, ring_size=1 << 18, seed=99, irq_cpu=2,
    )  # fmt: skip
    raw = p.pack()
    magic, version, mech, peer_id, peer, role = struct.unpack_from("<QIIIII", raw)
    assert (magic, version, mech, peer_id, peer, role) == (L.MAGIC, L.VERSION, 3, 3, 4, 1)
    assert struct.unpack_from("<QI", raw, len(raw) - 12) == (99, 2)


def _fletcher(data: bytes) -> tuple[int, int]:
    a = b = 0
    for i in range(0, len(data), 8):
        a = (a + int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little")) & L.MASK64
        b = (b + a) & L.MASK64
    return a, b


@given(st.integers(0, 5000), st.integers(0, 2**64 - 1))
def test_pattern_checksum_closed_form_matches_the_sum(size, seed):
    assert L.pattern_checksum(size, seed) == _fletcher(L.pattern_bytes(size, seed))


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 100))
def test_pattern_bytes_are_one_stream(offset, size, seed):
    whole = L.pattern_bytes(offset + size, seed)
    assert L.pattern_bytes(size, seed, offset) == whole[offset:]


def test_pattern_words_never_repeat_nearby():
    data = L.pattern_bytes(8 * 4096, 1)
    words = {data[i : i + 8] for i in range(0, len(data), 8)}
    assert len(words) == 4096


@pytest.mark.parametrize("size", [4096 * 4, 1 << 20, (1 << 20) + 4096, 1 << 30])
def test_shared_layout_fits_both_rings(size):
    lay = L.SharedLayout.for_size(size)
    assert lay.ring_size & (lay.ring_size - 1) == 0
    assert lay.ring_data(1) + lay.ring_size <= size
    assert lay.ring_ctl(0) + 2 * L.RING_CTL_SIZE <= L.SHM_HEADER_SIZE
    assert lay.ring_size * 2 > (size - L.SHM_HEADER_SIZE) // 2  # the largest that fits
    tx0, _, rx0, _ = lay.rings_for(0)
    tx1, _, rx1, _ = lay.rings_for(1)
    assert (tx0, rx0) == (rx1, tx1)


@pytest.mark.parametrize("size", [0, 4096, 4096 * 3, 12345, (1 << 30) + 4096])
def test_shared_layout_refuses_bad_sizes(size):
    with pytest.raises(ConfigError):
        L.SharedLayout.for_size(size)


def test_names_parse_and_refuse():
    assert L.Mechanism.parse("shm-irq") is L.Mechanism.SHM_IRQ
    assert L.PioWidth.parse("dword") is L.PioWidth.DWORD
    assert L.WaitMode.parse("spin") is L.WaitMode.SPIN
    for parse in (L.Mechanism.parse, L.PioWidth.parse, L.WaitMode.parse):
        with pytest.raises(ConfigError):
            parse("carrier-pigeon")

"""The virtio balloon without KVM: a Python driver plays the guest (kvmpy.devices.virtio.driver)
on a GuestMemory; what the device discards is checked on the memory itself."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio import balloon as BL
from kvmpy.devices.virtio import mmio as M
from kvmpy.devices.virtio.constants import F_VERSION_1, STATUS_DEVICE_NEEDS_RESET
from kvmpy.devices.virtio.driver import Arena, MmioRegs, start
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.memory import PAGE_SIZE, GuestMemory

MEM = 8 << 20
HOLE = (8 << 20, 12 << 20)  # a second region after a hole
ARENA = 0x10000
BUF = 0x100000
DATA = 0x200000  # pages the guest gives away


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, MEM)
    m.add_region(HOLE[1], 4 << 20)
    m.fill(DATA, 2 << 20, 0x5A)
    yield m
    m.close()


class Audit:
    """The discard callback, recording what the device asked for."""

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, gpa: int, length: int) -> bool:
        ok = self.memory.discard(gpa, length)
        self.calls.append((gpa, length, ok))
        return ok


def bring_up(mem, features=BL.F_STATS_VQ | BL.F_PAGE_REPORTING):
    audit = Audit(mem)
    end = max(r.end for r in mem.regions)
    dev = BL.VirtioBalloon(discard=audit, ram_pages=mem.size // PAGE_SIZE,
                           pfn_limit=end // PAGE_SIZE)  # fmt: skip
    irq = CallbackIrq()
    t = M.VirtioMmio(dev, mem, irq, base=0xD000_0000)
    regs = MmioRegs(t)
    nq = 2 + bool(features & BL.F_STATS_VQ) + bool(features & BL.F_PAGE_REPORTING)
    qs = start(regs, Arena(mem, ARENA, 0x20000), nq, size=64, features=F_VERSION_1 | features)
    return dev, regs, qs, audit


def pfn_buffer(mem, pfns, at=BUF):
    data = struct.pack(f"<{len(pfns)}I", *pfns)
    mem.write(at, data)
    return [(at, len(data))]


def resident_pages(mem, gpa, pages) -> int:
    """Pages of [gpa, +pages) that hold data (a discarded page reads as zero)."""
    return sum(any(mem.read(gpa + i * PAGE_SIZE, PAGE_SIZE)) for i in range(pages))


def test_inflate_gives_the_pages_back_and_deflate_takes_them(mem):
    dev, regs, (inflate, deflate, stats, report), audit = bring_up(mem)
    assert dev.role(2) == "stats" and dev.role(3) == "reporting"
    pfns = [DATA // PAGE_SIZE + i for i in range(0, 64)]  # 256 KiB
    inflate.add(pfn_buffer(mem, pfns), [])
    regs.notify(0)
    assert inflate.take_used() and resident_pages(mem, DATA, 64) == 0
    assert resident_pages(mem, DATA + 64 * PAGE_SIZE, 64) == 64  # the rest untouched
    assert audit.calls == [(DATA, 64 * PAGE_SIZE, True)]  # one run, one discard
    assert dev.ballooned.count == 64 and dev.inflated_pages == 64
    deflate.add(pfn_buffer(mem, pfns[:16]), [])
    regs.notify(1)
    assert deflate.take_used() and dev.ballooned.count == 48 and dev.deflated_pages == 16
    # The same frames again: counted once.
    inflate.add(pfn_buffer(mem, pfns[16:32]), [])
    regs.notify(0)
    inflate.take_used()
    assert dev.ballooned.count == 48


def test_a_guest_cannot_make_the_vmm_release_memory_outside_its_ram(mem):
    dev, regs, (inflate, *_), audit = bring_up(mem)
    ram_end = (HOLE[1] + (4 << 20)) // PAGE_SIZE
    bogus = [HOLE[0] // PAGE_SIZE, HOLE[0] // PAGE_SIZE + 5, ram_end, ram_end + 1, 0xFFFF_FFFF,
             (1 << 32) - 2]  # fmt: skip
    good = [DATA // PAGE_SIZE]
    inflate.add(pfn_buffer(mem, bogus + good), [])
    regs.notify(0)
    inflate.take_used()
    assert dev.refused_pfns == len(bogus) and dev.ballooned.count == 1
    assert dev.broken is None and not dev.status & STATUS_DEVICE_NEEDS_RESET
    for gpa, length, ok in audit.calls:
        assert ok == mem.is_ram(gpa, length)
    assert resident_pages(mem, DATA, 2) == 1


def test_shared_and_read_only_memory_is_never_discarded():
    import os

    m = GuestMemory()
    m.add_region(0, 1 << 20)
    fd = os.memfd_create("peer")  # memory another VMM handed us: not ours to release
    os.ftruncate(fd, 1 << 20)
    m.add_region(1 << 20, 1 << 20, fd=fd)
    m.add_region(2 << 20, 1 << 20, readonly=True)
    for base in (0, 1 << 20, 2 << 20):
        m.fill(base, 1 << 20, 1)
    try:
        assert not m.discard(1 << 20, PAGE_SIZE) and not m.discard(2 << 20, PAGE_SIZE)
        assert not m.discard(100, PAGE_SIZE) and not m.discard(0, 100)  # not page-aligned
        assert not m.discard((1 << 20) - PAGE_SIZE, 2 * PAGE_SIZE)  # across two regions
        assert m.read(1 << 20, 1) == b"\1" and m.read(2 << 20, 1) == b"\1"
        assert m.discard(0, PAGE_SIZE) and m.read(0, 1) == b"\0"
    finally:
        m.close()
        os.close(fd)


def test_free_page_reporting_discards_the_reported_pages(mem):
    dev, regs, (_, _, _, report), audit = bring_up(mem)
    # Two free ranges, one with ragged edges: only whole pages go.
    report.add([], [(DATA, 128 * PAGE_SIZE), (DATA + 200 * PAGE_SIZE + 100, 3 * PAGE_SIZE)])
    regs.notify(3)
    assert report.take_used()
    assert resident_pages(mem, DATA, 128) == 0
    assert resident_pages(mem, DATA + 200 * PAGE_SIZE, 4) == 2  # the partial pages stay
    assert dev.reported_bytes == 130 * PAGE_SIZE


def test_reporting_outside_ram_is_refused_by_the_queue(mem):
    dev, regs, (_, _, _, report), _ = bring_up(mem)
    report.add([], [(HOLE[0], 2 * PAGE_SIZE)])  # a buffer in the hole: a protocol violation
    regs.notify(3)
    assert dev.broken and "outside guest RAM" in dev.broken


def test_statistics_are_asked_for_and_read(mem):
    dev, regs, (_, _, stats, _), _ = bring_up(mem)
    blob = struct.pack("<HQHQHQ", 4, 123 << 20, 5, 512 << 20, 99, 7)
    mem.write(BUF, blob)
    stats.add([(BUF, len(blob))], [])
    regs.notify(2)
    assert dev.last_stats == {"free_memory": 123 << 20, "total_memory": 512 << 20, "tag_99": 7}
    assert not stats.take_used()  # the device holds the buffer until it wants new figures
    assert dev.request_stats() and stats.take_used()  # handed back: a request
    assert not dev.request_stats()  # nothing held now


def test_queue_roles_follow_the_negotiated_features(mem):
    dev, regs, qs, audit = bring_up(mem, features=BL.F_PAGE_REPORTING)
    assert len(qs) == 3 and dev.role(2) == "reporting" and dev.role(3) is None
    qs[2].add([], [(DATA, 4 * PAGE_SIZE)])
    regs.notify(2)
    assert qs[2].take_used() and dev.reported_bytes == 4 * PAGE_SIZE


def test_target_and_actual_in_config_space(mem):
    dev, regs, _, _ = bring_up(mem)
    changes = dev.config_generation
    assert dev.set_target(1 << 40) == dev.ram_pages  # never more than the guest has
    assert dev.set_target(300) == 300 and dev.config_generation > changes
    assert struct.unpack("<I", regs.config(0, 4))[0] == 300
    regs.dev.write(M.CONFIG_OFFSET + 4, struct.pack("<I", 250))  # the driver's `actual`
    assert dev.actual == 250 and struct.unpack("<I", regs.config(4, 4))[0] == 250
    regs.dev.write(M.CONFIG_OFFSET + 0, struct.pack("<I", 7))  # num_pages is the device's
    assert dev.num_pages == 300


def test_state_round_trip_keeps_the_held_statistics_buffer(mem):
    dev, regs, (inflate, _, stats, _), _ = bring_up(mem)
    inflate.add(pfn_buffer(mem, [DATA // PAGE_SIZE + i for i in (0, 1, 2, 7)]), [])
    regs.notify(0)
    mem.write(BUF + 0x800, struct.pack("<HQ", 4, 1 << 20))
    stats.add([(BUF + 0x800, 10)], [])
    regs.notify(2)
    dev.set_target(10)
    state = regs.dev.state()
    dev2 = BL.VirtioBalloon(ram_pages=dev.ram_pages, pfn_limit=dev.ballooned.limit)
    t2 = M.VirtioMmio(dev2, mem, CallbackIrq(), base=0xD000_0000)
    t2.restore_state(state)
    assert dev2.num_pages == 10 and dev2.ballooned.count == 4
    assert dev2.ballooned.runs() == [[DATA // PAGE_SIZE, 3], [DATA // PAGE_SIZE + 7, 1]]
    assert dev2.last_stats == {"free_memory": 1 << 20}
    assert dev2.request_stats() and stats.take_used()


def test_reset_empties_the_balloon(mem):
    dev, regs, (inflate, *_), _ = bring_up(mem)
    inflate.add(pfn_buffer(mem, [DATA // PAGE_SIZE]), [])
    regs.notify(0)
    regs.reset()
    assert dev.ballooned.count == 0 and dev.actual == 0


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=300))
def test_fuzz_frame_numbers(pfns):
    """Whatever frame numbers a guest sends, only frames of its RAM are discarded."""
    m = GuestMemory()
    m.add_region(0, MEM)
    m.add_region(HOLE[1], 4 << 20)
    try:
        dev, regs, (inflate, deflate, *_), audit = bring_up(m)
        for q, idx in ((inflate, 0), (deflate, 1), (inflate, 0)):
            q.add(pfn_buffer(m, pfns[:256]), [])
            regs.notify(idx)
            q.take_used()
        for gpa, length, ok in audit.calls:
            assert ok == (m.is_ram(gpa, length) and gpa % PAGE_SIZE == 0)
        valid = {p for p in pfns[:256] if m.is_ram(p * PAGE_SIZE, PAGE_SIZE)}
        assert dev.ballooned.count == len(valid)
        assert dev.refused_pfns == 2 * (len(set(pfns[:256])) - len(valid))
        assert dev.internal_errors == 0
    finally:
        m.close()


# --- with a guest driver (KVM) -------------------------------------------------------------------


KVMPY = [sys.executable, "-m", "kvmpy"]


def _ctl(sock, *args):
    p = subprocess.run([*KVMPY, "ctl", str(sock), *args, "--json"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _wait(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def balloon_guest(tmp_path, report: int) -> Path:
    from kvmpy.ksm.guest import BalloonParams, balloon_image

    return balloon_image(tmp_path / "b.elf", BalloonParams(work_pages=4096, report=report))


class BalloonVm:
    """`kvmpy ARGS --control SOCK` in the background, its output in a file."""

    def __init__(self, tmp_path, *args):
        self.sock = tmp_path / "vm.sock"
        self.out = tmp_path / "vm.out"
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen([*KVMPY, *map(str, args), "--control", str(self.sock)],
                                         stdout=f, stderr=subprocess.STDOUT)  # fmt: skip

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text, timeout=60.0):
        _wait(lambda: text in self.output() or self.proc.poll() is not None, timeout)
        assert text in self.output(), self.output()

    def stop(self):
        if self.proc.poll() is None:
            subprocess.run([*KVMPY, "ctl", str(self.sock), "stop"], capture_output=True)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.kvm
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "transport, irqchip", [("mmio", True), ("pci", True), ("mmio", False)],
    ids=["mmio", "pci", "mmio-polling"],
)  # fmt: skip
def test_a_guest_gives_memory_back(tmp_path, gcc_available, transport, irqchip):
    vm = BalloonVm(tmp_path, "run", balloon_guest(tmp_path, 0), "--balloon", "--transport",
                   transport, "--mem", "64M", *(["--irqchip"] if irqchip else []))  # fmt: skip
    try:
        vm.wait_for("freed 4096 pages")
        _wait(lambda: vm.sock.exists())
        used = _ctl(vm.sock, "stats")["ram"]["rss_bytes"]
        assert used >= 16 << 20  # freeing in the guest alone gives the host nothing
        r = _ctl(vm.sock, "balloon", "12M")
        assert r["target_bytes"] == 12 << 20
        _wait(lambda: _ctl(vm.sock, "balloon")["actual_bytes"] == 12 << 20)
        r = _ctl(vm.sock, "balloon")
        assert r["ballooned_bytes"] == 12 << 20 and r["refused_pfns"] == 0
        assert r["ram"]["rss_bytes"] <= used - (12 << 20) + (256 << 10)
        assert r["guest_stats"]["free_memory"] == 4 << 20  # the guest's own account
        _ctl(vm.sock, "balloon", "0")
        _wait(lambda: _ctl(vm.sock, "balloon")["actual_bytes"] == 0)
        assert _ctl(vm.sock, "balloon")["ballooned_bytes"] == 0
        vm.wait_for("balloon at 0 pages (target 0)")
    finally:
        vm.stop()


@pytest.mark.kvm
@pytest.mark.timeout(180)
def test_free_page_reporting_returns_memory_without_the_host_asking(tmp_path, gcc_available):
    vm = BalloonVm(tmp_path, "run", balloon_guest(tmp_path, 1), "--balloon", "--irqchip",
                   "--mem", "64M")  # fmt: skip
    try:
        vm.wait_for("reported 4096 free pages")
        _wait(lambda: vm.sock.exists())
        r = _ctl(vm.sock, "balloon")
        assert r["reported_bytes"] == 16 << 20 and r["ballooned_bytes"] == 0
        assert r["ram"]["rss_bytes"] < 2 << 20
        p = subprocess.run([*KVMPY, "ctl", str(vm.sock), "balloon"], capture_output=True,
                           text=True)  # fmt: skip
        assert "free page reporting gave back 16.0 MiB" in p.stdout
    finally:
        vm.stop()


@pytest.mark.kvm
@pytest.mark.timeout(240)
def test_a_ballooned_vm_snapshots_and_restores(tmp_path, gcc_available):
    """The balloon's state (its pages, its target, the statistics buffer it holds) travels
    with the snapshot; the restored device deflates and answers statistics requests."""
    (tmp_path / "a").mkdir()
    vm = BalloonVm(tmp_path / "a", "run", balloon_guest(tmp_path, 0), "--balloon", "--irqchip",
                   "--mem", "64M")  # fmt: skip
    try:
        vm.wait_for("freed 4096 pages")
        _wait(lambda: vm.sock.exists())
        _ctl(vm.sock, "balloon", "8M")
        _wait(lambda: _ctl(vm.sock, "balloon")["actual_bytes"] == 8 << 20)
        _ctl(vm.sock, "snapshot", str(tmp_path / "snap"))
    finally:
        vm.stop()
    cfg = json.loads((tmp_path / "snap" / "state.json").read_text())["config"]
    assert [d["kind"] for d in cfg["devices"]] == ["virtio-balloon"]
    (tmp_path / "b").mkdir()
    back = BalloonVm(tmp_path / "b", "restore", tmp_path / "snap")
    try:
        _wait(lambda: back.sock.exists())
        r = _ctl(back.sock, "balloon")
        assert r["target_bytes"] == 8 << 20 and r["ballooned_bytes"] == 8 << 20
        assert r["guest_stats"]["free_memory"] == 8 << 20  # asked again, answered again
        _ctl(back.sock, "balloon", "0")
        _wait(lambda: _ctl(back.sock, "balloon")["actual_bytes"] == 0)
        assert _ctl(back.sock, "balloon")["guest_stats"]["free_memory"] == 16 << 20
    finally:
        back.stop()


def test_balloon_on_the_command_line(tmp_path, capsys):
    from kvmpy.cli import main

    assert main(["run", "hello", "--balloon", "--transport", "pci", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["devices"] == [{"kind": "virtio-balloon", "id": "balloon0",
                               "args": {"transport": "pci"}}]  # fmt: skip

"""The Python API: config -> machine -> load -> run -> result; devices, buses, statistics."""

from __future__ import annotations

import io
import threading
import time

import pytest

from kvmpy.bus import MmioBus, PortBus
from kvmpy.devices import Device, Output
from kvmpy.devices.debugcon import DebugConsole
from kvmpy.errors import ConfigError
from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig, ram_layout
from kvmpy.result import Stop, StopReason

# --- sans-IO devices and buses (no KVM) ------------------------------------------------------


def test_debugcon_is_sans_io():
    d = DebugConsole()
    assert d.write(0, b"A") == Output(b"A")
    assert d.write(0, b"BC") == Output(b"B")  # a wider write sends its low byte
    assert d.write_string(0, 1, memoryview(b"xyz")) == Output(b"xyz")
    assert d.read(0, 1) == b"\xe9"
    assert d.state() == {"bytes_written": 5}
    e = DebugConsole()
    e.restore_state(d.state())
    assert e.bytes_written == 5


def test_port_bus_rejects_overlaps_and_bad_ranges():
    bus = PortBus()
    bus.register(0x3F8, 8, DebugConsole())
    assert bus.lookup(0x3FB).offset == 3
    assert bus.lookup(0x400) is None
    with pytest.raises(ConfigError, match="already taken"):
        bus.register(0x3FF, 2, DebugConsole())
    with pytest.raises(ConfigError):
        bus.register(0xFFFF, 2, DebugConsole())


def test_mmio_bus():
    bus = MmioBus()
    a, b = Device(), Device()
    bus.register(0x1000, 0x100, a)
    bus.register(0x2000, 0x10, b)
    assert bus.lookup(0x1050) == (a, 0x50)
    assert bus.lookup(0x200F) == (b, 0xF)
    assert bus.lookup(0x2010) is None and bus.lookup(0xFFF) is None
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(0x10F0, 0x20, Device())
    assert bus.ranges() == [(0x1000, 0x1100, a), (0x2000, 0x2010, b)]


def test_ram_layout_leaves_the_mmio_hole():
    assert ram_layout(64 << 20) == [(0, 64 << 20)]
    assert ram_layout(3 << 30) == [(0, 3 << 30)]
    assert ram_layout(6 << 30) == [(0, 3 << 30), (4 << 30, 3 << 30)]


@pytest.mark.parametrize(
    "config,message",
    [
        (MachineConfig(memory="512K"), "at least 1M"),
        (MachineConfig(memory="2T"), "at most 1T"),
        (MachineConfig(memory=(1 << 20) + 1), "multiple of 4K"),
        (MachineConfig(vcpus=0), "1 to 16 vCPUs"),
        (MachineConfig(vcpus=17), "1 to 16 vCPUs"),
        (MachineConfig(pit=True), "needs the in-kernel irqchip"),
        (MachineConfig(mode="nope"), "unknown mode"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validated()


# --- running machines -------------------------------------------------------------------------


class Recorder(Device):
    name = "recorder"

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return bytes([0x40 + offset]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))
        return Output(b"<%d>" % offset)


@pytest.mark.kvm
def test_custom_port_device(assemble, kvm):
    code = assemble(
        "mov $0x600, %dx\n mov $0x11, %al\n out %al, %dx\n"
        "inc %dx\n in %dx, %al\n mov %eax, %edi\n"
        "lea msg(%rip), %rsi\n mov $3, %ecx\n mov $0x602, %dx\n rep outsb\n hlt\n"
        'msg: .ascii "abc"'
    )
    rec = Recorder()
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.add_pio_device(0x600, 4, rec)
        m.load(load_raw(code))
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.HLT
    assert rec.writes == [(0, b"\x11"), (2, b"a"), (2, b"b"), (2, b"c")]
    assert result.regs["rdi"] & 0xFF == 0x41
    assert result.output == b"<0><2><2><2>"
    ports = result.stats.to_dict()["by_port"]
    assert ports["0x600"] == {
        "name": "recorder",
        "in": 0,
        "out": 1,
        "vmm_time_us": ports["0x600"]["vmm_time_us"],
    }
    assert ports["0x601"]["in"] == 1
    # rep outsb: KVM may batch the string into one exit or (KVM-PVM) exit once per byte.
    assert 1 <= ports["0x602"]["out"] <= 3


class Broken(Device):
    name = "broken"

    def read(self, offset, size):
        raise RuntimeError("no register here")


@pytest.mark.kvm
def test_a_device_that_raises_stops_the_vm_with_vmm_error(assemble, kvm):
    code = assemble("mov $0x600, %dx\n in %dx, %al\n hlt")
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.add_pio_device(0x600, 4, Broken())
        m.load(load_raw(code))
        result = m.run(timeout=30)  # raises nothing
    assert result.stop_reason is StopReason.VMM_ERROR
    assert "device broken raised RuntimeError: no register here" in result.message


class Mmio(Device):
    name = "mmio-regs"

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return bytes([0xA0 + offset]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


# mode -> (RAM, device address, code: read a byte at device+4 into bl, write 0x5A at device+8)
MMIO_CASES = {
    # Real mode reaches 0x100000-0x10FFEF through segment 0xFFFF: outside a 1 MiB guest's RAM.
    "real": ("1M", 0x100000, 16, "mov $0xFFFF, %ax\n mov %ax, %ds\n mov (0x14), %bl\n"
             "movb $0x5A, (0x18)\n hlt"),
    "protected": ("16M", 0xD0000000, 32, "mov (0xD0000004), %bl\n movb $0x5A, (0xD0000008)\n hlt"),
    "long": ("16M", 0xD0000000, 64, "mov $0xD0000000, %esi\n mov 4(%rsi), %bl\n"
             "movb $0x5A, 8(%rsi)\n hlt"),
    # long-user: CPL3 cannot hlt; the exit hypercall ends it.
    "long-user": ("16M", 0x10000000, 64, "mov $0x10000000, %esi\n mov 4(%rsi), %bl\n"
                  "movb $0x5A, 8(%rsi)\n xor %eax, %eax\n xor %edi, %edi\n mov $0x500, %dx\n"
                  "out %eax, %dx"),
}  # fmt: skip


@pytest.mark.kvm
@pytest.mark.parametrize("mode", sorted(MMIO_CASES))
def test_an_mmio_device_works_in_every_mode(assemble, kvm, mode):
    memory, base, bits, text = MMIO_CASES[mode]
    dev = Mmio()
    with Machine(MachineConfig(mode=mode, memory=memory), kvm=kvm) as m:
        m.add_mmio_device(base, 0x100, dev)
        m.load(load_raw(assemble(text, bits), load_addr=0x8000, entry=0x8000))
        result = m.run(timeout=30)
    assert result.stop_reason in (StopReason.HLT, StopReason.EXIT), result.message
    assert result.regs["rbx"] & 0xFF == 0xA4
    assert dev.writes == [(8, b"\x5a")]


def test_paged32_maps_device_memory_uncached(kvm):
    # paged32 cannot run on KVM-PVM hosts; its tables are checked with the page walker.
    from kvmpy.arch.x86.paging import PTE_PCD, PTE_PWT
    from kvmpy.arch.x86.vmem import Regime, VirtualMemory

    with Machine(MachineConfig(mode="paged32", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(b"\xf4", load_addr=0x8000, entry=0x8000))
        vm = VirtualMemory(m.memory, Regime.from_sregs(m.boot.sregs))
        for addr in (0xD0000000, 0x10000000, 0xFFFFF000):
            assert vm.translate(addr) == addr
        pde = m.memory.read_u32(m.boot.sregs.cr3 + (0xD0000000 >> 22) * 4)
        assert pde & (PTE_PCD | PTE_PWT) == PTE_PCD | PTE_PWT
        assert m.memory.read_u32(m.boot.sregs.cr3) & PTE_PCD == 0  # RAM stays cached


def test_mmio_devices_live_below_4g(kvm):
    with (
        Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m,
        pytest.raises(ConfigError, match="not below 4 GiB"),
    ):
        m.add_mmio_device(1 << 32, 0x100, Mmio())


@pytest.mark.kvm
def test_unassigned_ports_and_mmio(assemble, kvm):
    # in from a port nobody owns reads all ones; so does MMIO outside RAM; writes are ignored.
    code = assemble(
        "mov $0x1234, %dx\n in %dx, %eax\n mov %eax, %ebx\n out %eax, %dx\n"
        "mov $0xD0000000, %esi\n mov (%rsi), %ecx\n movl $5, (%rsi)\n hlt"
    )
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))  # kvmpy maps 0xD0000000 (the MMIO hole), uncached
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.HLT, result.message
    assert result.regs["rbx"] == 0xFFFFFFFF
    assert result.regs["rcx"] == 0xFFFFFFFF
    assert result.exits["mmio"] == 2
    assert result.stats.port(0x1234).reads == 1 and result.stats.port(0x1234).writes == 1


@pytest.mark.kvm
def test_console_sink_and_capture(kvm):
    sink = io.BytesIO()
    with Machine(
        MachineConfig(mode="long", memory="16M"), kvm=kvm, console=sink, capture_output=False
    ) as m:
        m.load(load_raw(bytes.fromhex("b041e6e9f4")))  # mov al,'A'; out 0xe9,al; hlt
        result = m.run(timeout=30)
    assert sink.getvalue() == b"A"
    assert result.output == b""


@pytest.mark.kvm
def test_run_continues_after_a_stop(assemble, kvm):
    code = assemble("mov $1, %edi\n hlt\n mov $2, %edi\n hlt")
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        assert m.run(timeout=30).regs["rdi"] == 1
        assert m.run(timeout=30).regs["rdi"] == 2


@pytest.mark.kvm
def test_request_stop_and_pause_from_another_thread(assemble, kvm):
    """A spinning CPL3 guest never exits; immediate_exit plus a kick gets the VMM back."""
    code = assemble("1: jmp 1b")
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        vcpu = m.vcpus[0]
        t = threading.Timer(0.2, vcpu.request_pause, kwargs={"kick": True})
        t.start()
        assert vcpu.run() is None  # paused, not stopped
        t = threading.Timer(0.2, vcpu.request_stop, kwargs={"kick": True})
        t.start()
        stop = vcpu.run()
        assert stop.reason is StopReason.INTERRUPTED
        t.join()


@pytest.mark.kvm
def test_vcpu_in_a_thread_can_be_kicked(assemble, kvm):
    code = assemble("1: jmp 1b")
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        stops = []
        t = threading.Thread(target=lambda: stops.append(m.vcpus[0].run()))
        t.start()
        while m.vcpus[0].thread_ident is None:
            pass
        m.vcpus[0].request_stop(StopReason.INTERRUPTED, "test", kick=True)
        t.join(timeout=10)
        assert not t.is_alive()
        assert stops[0].reason is StopReason.INTERRUPTED and stops[0].message == "test"


@pytest.mark.kvm
def test_stats_by_reason_and_port(gcc_available, kvm):
    from kvmpy.sdk.examples import find_example

    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load_file(find_example("hello").build())
        result = m.run(timeout=30)
    st = result.stats
    assert st.total == 17 == st.counts[2]
    assert st.io_out == 17 and st.io_in == 0
    d = st.to_dict()
    assert d["by_reason"]["io"]["count"] == 17
    # Short runs are timed exactly; the last exit (the exit hypercall) has no re-entry to time.
    assert d["by_reason"]["io"]["timed"] == 16
    assert d["by_reason"]["io"]["vmm_time_us"] > 0
    assert d["by_port"]["0x500"]["out"] == 17
    reasons, ports = st.rich_tables()
    assert reasons.row_count == 2 and ports.row_count == 1


@pytest.mark.kvm
def test_long_runs_sample_the_fast_path(kvm):
    import struct

    n = 5000
    code = (
        b"\xb9"
        + struct.pack("<I", n)
        + bytes.fromhex("b80300000066ba0005efffc975f2")
        + bytes.fromhex("31c031ffef")
    )
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        result = m.run(timeout=60)
    st = result.stats
    assert st.total == n + 1
    timed = st.timed[2]
    assert 256 <= timed < 256 + n // 64 + 2
    assert st.est_vmm_ns(2) > 0 and st.run_ns > 0


@pytest.mark.kvm
def test_load_before_run_is_required(kvm):
    with (
        Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m,
        pytest.raises(ConfigError, match="load an image"),
    ):
        m.run()


@pytest.mark.kvm
def test_mmio_device_cannot_overlap_ram(kvm):
    with (
        Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m,
        pytest.raises(ConfigError, match="overlaps guest RAM"),
    ):
        m.add_mmio_device(0x1000, 0x100, Device())


@pytest.mark.kvm
def test_result_json_shape(kvm):
    import json

    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(bytes.fromhex("f4")))
        doc = json.loads(json.dumps(m.run(timeout=30).to_dict()))
    assert doc["stop_reason"] == "hlt" and doc["exit_code"] == 0
    assert doc["exits"] == {"hlt": 1}
    assert doc["regs"]["rip"] == 1


@pytest.mark.kvm
def test_yield_on_io_yields_at_hypercalls_too(kvm):
    """The on-io scheduler switches at every port-I/O exit, hypercalls included."""
    # out 0xe9, al; hypercall 3 (num_exits) twice; exit.
    code = bytes.fromhex("e6e9b80300000066ba0005efef31c031ffef")
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        m.vcpus[0].yield_on_io = True
        results = []
        for _ in range(10):
            stop = m.vcpus[0].run()
            results.append(stop.reason if stop else None)
            if stop:
                break
        assert results == [None, None, None, StopReason.EXIT]
        assert m.result(m.vcpus[0].stopped).regs["rax"] == 0


@pytest.mark.kvm
def test_pause_resume_and_end_run_from_another_thread(assemble, kvm):
    """pause() holds every vCPU out of the guest (its registers are then stable), resume() lets
    it go on, end_run() ends the run with the caller's reason."""
    code = assemble("1: inc %rbx\n jmp 1b")
    seen = []

    def controller():
        while not m.running:
            time.sleep(0.001)
        time.sleep(0.05)
        m.pause()
        seen.append(m.vcpu_call(0, lambda: m.vcpus[0].get_regs().rbx))
        time.sleep(0.05)
        seen.append(m.vcpu_call(0, lambda: m.vcpus[0].get_regs().rbx))  # still paused
        m.resume()
        time.sleep(0.05)
        m.pause()
        seen.append(m.vcpu_call(0, lambda: m.vcpus[0].get_regs().rbx))
        m.end_run(Stop(StopReason.INTERRUPTED, 0, "ended by the controller"))
        m.resume()

    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        t = threading.Thread(target=controller)
        t.start()
        result = m.run(timeout=30)
        t.join()
    assert result.stop_reason is StopReason.INTERRUPTED
    assert result.message == "ended by the controller"
    assert 0 < seen[0] == seen[1] < seen[2] <= result.regs["rbx"]


@pytest.mark.kvm
def test_mark_restored_runs_a_machine_set_up_by_hand(gcc_available, kvm):
    """The construction path for snapshots and migrations: copy memory and registers from one
    machine into a fresh one, mark it restored, and it runs the same guest to the same end."""
    from kvmpy.sdk.examples import find_example

    image = find_example("hello").build()
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as a:
        a.load_file(image)
        with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as b:
            b.memory.write(0, a.memory.read(0, 16 << 20))
            b.vcpus[0].fd.set_sregs(a.vcpus[0].fd.get_sregs())
            b.vcpus[0].fd.set_regs(a.vcpus[0].fd.get_regs())
            b.mark_restored(a.layout, a.entry_ip)
            assert b.boot.regs.rip == a.entry_ip and b.layout is a.layout
            copy = b.run(timeout=30)
        original = a.run(timeout=30)
    assert copy.stop_reason is original.stop_reason is StopReason.EXIT
    assert copy.output == original.output and b"Hello" in copy.output
    assert b.output_bytes == a.output_bytes == len(original.output)


def test_migrated_is_a_clean_stop():
    from kvmpy.result import RunResult
    from kvmpy.stats import ExitStats

    r = RunResult(StopReason.MIGRATED, 0, "migrated", {}, {}, ExitStats())
    assert StopReason.MIGRATED.ok and r.process_exit_status == 0


@pytest.mark.kvm
def test_captured_output_is_bounded(kvm, assemble):
    """A guest that prints without end cannot grow the VMM's memory: the capture keeps a tail."""
    code = assemble(
        "mov $0x41, %al\n mov $20000, %ecx\n1: out %al, $0xe9\n dec %ecx\n jnz 1b\n hlt"
    )
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm, capture_limit=1000) as m:
        m.load(load_raw(code))
        result = m.run(timeout=60)
        assert m.output_bytes == 20000
        assert len(m._output) <= 2000
    assert result.output == b"A" * 1000

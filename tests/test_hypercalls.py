"""The guest ABI (docs/abi.md): every hypercall, its error cases, hostile arguments."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.arch.x86.modes import Mode
from kvmpy.errors import ConfigError, GuestMemoryError
from kvmpy.hypercalls import MAX_STRING
from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.sdk.examples import find_example

pytestmark = pytest.mark.kvm

MEM = 16 << 20
DATA = 0x10000  # guest buffer used by the tests (identity-mapped RAM, away from the code)
NOT_RAM = 0x7000000000
OUT_HLT = bytes.fromhex("eff4")  # out dx, eax ; hlt  (out dx, ax in real mode)


def neg(e: int) -> int:
    return (-e) & (2**64 - 1)


def call(kvm, nr, a0=0, a1=0, a2=0, a3=0, *, mode="long", setup=None, handler=None):
    """Make one hypercall from the guest with these registers; returns (result, closed machine)."""
    with Machine(MachineConfig(mode=mode, memory=MEM), kvm=kvm) as m:
        m.load(load_raw(OUT_HLT))
        if handler is not None:
            m.hypercalls.register(nr, handler, "test")
        if setup is not None:
            setup(m)
        regs = m.vcpus[0].fd.get_regs()
        regs.rax, regs.rdx, regs.rdi, regs.rsi, regs.rcx, regs.rbx = nr, 0x500, a0, a1, a2, a3
        m.vcpus[0].fd.set_regs(regs)
        result = m.run(timeout=30)
        return result, m


def test_abi_check_example_passes_in_every_runnable_mode(run_guest):
    ex = find_example("abi-check")
    for mode in Mode:
        result = run_guest(ex.build(mode), mode.value)
        if result.stop_reason is StopReason.HOST_LIMITATION:
            assert mode is Mode.PAGED32
            continue
        assert result.stop_reason is StopReason.EXIT, (mode, result.message)
        assert result.exit_code == 0, result.output.decode()
        assert b"0 failures" in result.output


def test_exit_code(kvm):
    result, _ = call(kvm, 0, 0x1234)
    assert result.stop_reason is StopReason.EXIT
    assert result.exit_code == 0x34  # code & 0xff
    assert result.process_exit_status == 0x34


def test_putc_and_print32(kvm):
    result, _ = call(kvm, 1, 0x4142)
    assert (result.output, result.regs["rax"]) == (b"B", 0)
    result, _ = call(kvm, 2, 0xFFFF_FFFF_FFFF_FFFF)
    assert result.output == b"4294967295\n"  # unsigned, 32 bits
    assert result.regs["rax"] == 0


def test_num_exits_counts_exits_before_the_call(kvm):
    result, _ = call(kvm, 3)
    assert result.regs["rax"] == 0
    # Two exits through the debug console first: the hypercall sees 2.
    with Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m:
        m.load(load_raw(bytes.fromhex("e6e9e6e9") + bytes.fromhex("b803000000") + OUT_HLT))
        regs = m.vcpus[0].fd.get_regs()
        regs.rdx = 0x500
        m.vcpus[0].fd.set_regs(regs)
        r = m.run(timeout=30)
    assert r.regs["rax"] == 2


def _put(data: bytes, gpa: int = DATA):
    return lambda m: m.memory.write(gpa, data)


def test_print_str(kvm):
    result, _ = call(kvm, 4, DATA, setup=_put(b"hello\0ignored"))
    assert (result.output, result.regs["rax"]) == (b"hello", 0)


def test_print_str_errors(kvm):
    result, _ = call(kvm, 4, NOT_RAM)
    assert result.regs["rax"] == neg(errno.EFAULT) and result.output == b""
    result, _ = call(kvm, 4, 0x8000_0000_0000_0000)  # not canonical
    assert result.regs["rax"] == neg(errno.EFAULT)
    result, _ = call(kvm, 4, DATA, setup=_put(b"A" * (MAX_STRING + 10)))
    assert result.regs["rax"] == neg(errno.EINVAL) and result.output == b""
    # Exactly at the limit: 4095 characters and the NUL.
    result, _ = call(kvm, 4, DATA, setup=_put(b"B" * (MAX_STRING - 1) + b"\0"))
    assert result.regs["rax"] == 0 and result.output == b"B" * (MAX_STRING - 1)
    # A string that runs off the end of RAM without a NUL.
    result, _ = call(kvm, 4, MEM - 8, setup=_put(b"C" * 8, MEM - 8))
    assert result.regs["rax"] == neg(errno.EFAULT) and result.output == b""


def test_print_str_32bit_mode_ignores_upper_register_halves(kvm):
    result, _ = call(kvm, 4, (0xFFFF_FFFF << 32) | DATA, mode="protected", setup=_put(b"ok\0"))
    assert result.output == b"ok"
    assert result.regs["rax"] & 0xFFFF_FFFF == 0


def test_num_exits_by_type(kvm):
    def setup(m):
        m.memory.write(DATA, b"\xaa" * 64)

    result, _ = call(kvm, 5, DATA, 64, setup=setup)
    text = b"IO in: 0\nIO out: 0\n"
    assert result.regs["rax"] == len(text)


def test_num_exits_by_type_writes_the_text(kvm):
    with Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m:
        # in al, 0x80 (unknown port); out 0xe9, al; mov eax, 5; then the hypercall.
        m.load(load_raw(bytes.fromhex("e480e6e9b805000000") + OUT_HLT))
        regs = m.vcpus[0].fd.get_regs()
        regs.rdx, regs.rdi, regs.rsi = 0x500, DATA, 64
        m.vcpus[0].fd.set_regs(regs)
        m.memory.write(DATA, b"\xaa" * 64)
        result = m.run(timeout=30)
        text = b"IO in: 1\nIO out: 1\n"
        assert result.regs["rax"] == len(text)
        assert m.memory.read(DATA, len(text) + 2) == text + b"\0\xaa"


def test_num_exits_by_type_errors(kvm):
    text_len = len(b"IO in: 0\nIO out: 0\n")
    result, _ = call(kvm, 5, DATA, text_len)  # no room for the NUL
    assert result.regs["rax"] == neg(errno.EINVAL)
    result, _ = call(kvm, 5, NOT_RAM, 64)
    assert result.regs["rax"] == neg(errno.EFAULT)
    # A buffer that crosses the end of RAM: nothing is written, not even the part in RAM.
    with Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m:
        m.load(load_raw(OUT_HLT))
        regs = m.vcpus[0].fd.get_regs()
        regs.rax, regs.rdx, regs.rdi, regs.rsi = 5, 0x500, MEM - 4, 64
        m.vcpus[0].fd.set_regs(regs)
        m.memory.write(MEM - 4, b"\x55" * 4)
        result = m.run(timeout=30)
        assert result.regs["rax"] == neg(errno.EFAULT)
        assert m.memory.read(MEM - 4, 4) == b"\x55" * 4


def test_gva_to_hva(kvm):
    expected = []
    result, _ = call(
        kvm, 6, DATA + 0x123, setup=lambda m: expected.append(m.memory.gpa_to_hva(DATA + 0x123))
    )
    assert result.regs["rax"] == expected[0]
    result, _ = call(kvm, 6, NOT_RAM)
    assert result.regs["rax"] == neg(errno.EFAULT)


def test_unknown_hypercall_is_enosys(kvm):
    result, _ = call(kvm, 99)
    assert result.stop_reason is StopReason.HLT
    assert result.regs["rax"] == neg(errno.ENOSYS)


def test_16_bit_hypercall_in_real_mode(kvm):
    result, _ = call(kvm, 2, 77, mode="real")
    assert result.output == b"77\n"


# --- extra hypercalls from Python ----------------------------------------------------------


def test_register_an_extra_hypercall(kvm):
    seen = []

    def double(ctx, a0, a1, a2, a3):
        seen.append((a0, a1, a2, a3))
        return a0 * 2

    result, _ = call(kvm, 64, 21, 1, 2, 3, handler=double)
    assert result.regs["rax"] == 42
    assert seen == [(21, 1, 2, 3)]


def test_extra_hypercall_can_read_guest_memory(kvm):
    def read_greeting(ctx, gva, *_):
        return len(ctx.vmem().read_cstring(gva, 100))

    result, _ = call(kvm, 65, DATA, handler=read_greeting, setup=_put(b"four\0"))
    assert result.regs["rax"] == 4


def test_extra_hypercall_touching_bad_memory_gets_efault(kvm):
    def bad(ctx, *_):
        return ctx.memory.read_u64(NOT_RAM)

    result, _ = call(kvm, 66, handler=bad)
    assert result.stop_reason is StopReason.HLT
    assert result.regs["rax"] == neg(errno.EFAULT)


def _slow_path(m):
    m.vcpus[0].trace = True  # tracing sends every hypercall down the slow path


@pytest.mark.parametrize("setup", [None, _slow_path], ids=["fast-path", "slow-path"])
def test_a_handler_returning_none_means_zero(kvm, setup):
    result, _ = call(kvm, 13, handler=lambda ctx, *a: None, setup=setup)
    assert result.stop_reason is StopReason.HLT, result.message
    assert result.regs["rax"] == 0  # it held the hypercall number (13) before


@pytest.mark.parametrize("setup", [None, _slow_path], ids=["fast-path", "slow-path"])
def test_a_handler_returning_a_numpy_int_is_taken_as_its_value(kvm, setup):
    import numpy as np

    result, _ = call(kvm, 13, handler=lambda ctx, *a: np.uint64(2**64 - 1), setup=setup)
    assert result.stop_reason is StopReason.HLT, result.message
    assert result.regs["rax"] == 2**64 - 1


@pytest.mark.parametrize("setup", [None, _slow_path], ids=["fast-path", "slow-path"])
def test_a_handler_that_raises_stops_the_vm_with_vmm_error(kvm, setup):
    def broken(ctx, *a):
        raise ValueError("the device table is empty")

    with Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m:
        m.load(load_raw(OUT_HLT))
        m.hypercalls.register(14, broken, "lookup")
        if setup is not None:
            setup(m)
        regs = m.vcpus[0].fd.get_regs()
        regs.rax, regs.rdx = 14, 0x500
        m.vcpus[0].fd.set_regs(regs)
        result = m.run(timeout=30)  # raises nothing
    assert result.stop_reason is StopReason.VMM_ERROR
    assert "hypercall 14 (lookup)" in result.message
    assert "ValueError: the device table is empty" in result.message
    assert result.process_exit_status != 0


@pytest.mark.parametrize("setup", [None, _slow_path], ids=["fast-path", "slow-path"])
def test_a_handler_returning_a_non_int_stops_the_vm(kvm, setup):
    result, _ = call(kvm, 15, handler=lambda ctx, *a: "seven", setup=setup)
    assert result.stop_reason is StopReason.VMM_ERROR
    assert "hypercall 15 (test)" in result.message and "'seven'" in result.message


def test_registration_rules(kvm):
    with Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m:
        with pytest.raises(ConfigError, match="already 'putc'"):
            m.hypercalls.register(1, lambda *a: 0)
        m.hypercalls.register(1, lambda *a: 7, "mine", replace=True)
        assert m.hypercalls.name(1) == "mine"
        with pytest.raises(ConfigError):
            m.hypercalls.register(-1, lambda *a: 0)


# --- hostile guests ------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
interesting = st.sampled_from(
    [0, 1, DATA, MEM - 1, MEM, MEM - 4096, NOT_RAM, 2**47, 2**63, 2**64 - 1, 0xFFFF_FFFF]
)
arg = st.one_of(interesting, u64)


@pytest.fixture(scope="module", params=["long", "long-user", "protected"])
def hostile_machine(request):
    """One machine per mode reused across hypothesis examples (each reloads the image)."""
    from kvmpy.kvm import Kvm

    kvm = Kvm()
    m = Machine(MachineConfig(mode=request.param, memory=MEM), kvm=kvm)
    m.memory.write(DATA, b"not NUL-terminated " * 300)
    yield m
    m.close()
    kvm.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(nr=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)), a=st.tuples(arg, arg, arg, arg))
def test_random_registers_never_crash_the_vmm(hostile_machine, nr, a):
    m = hostile_machine
    # Reload every time: a hostile call may legitimately overwrite the guest's own code or
    # page tables (hc_num_exits_by_type writes wherever the guest points it).
    m.load(load_raw(OUT_HLT))
    regs = m.vcpus[0].fd.get_regs()
    regs.rax, regs.rdx = nr, 0x500
    regs.rdi, regs.rsi, regs.rcx, regs.rbx = a
    m.vcpus[0].fd.set_regs(regs)
    result = m.run(timeout=30)
    # The VMM never raises. The guest may wreck itself (e.g. point hc_num_exits_by_type at its
    # own code) and then stop on a fault, which is reported like any other stop.
    assert result.stop_reason is not StopReason.VMM_ERROR, result.message
    # At CPL3 the hlt after the hypercall is a #GP: the normal end there.
    hlt_at_cpl3 = (
        m.mode.user
        and result.stop_reason is StopReason.EXCEPTION
        and result.fault.vector == 13
        and result.regs["rip"] == m.entry_ip + 1
    )
    ended = result.stop_reason in (StopReason.HLT, StopReason.EXIT) or hlt_at_cpl3
    if not ended:
        # hc_num_exits_by_type pointed at the guest's own code and wrecked it.
        assert nr == 5 and result.message
        return
    rax = result.regs["rax"]
    if result.stop_reason is not StopReason.EXIT:
        signed = rax - 2**64 if rax >= 2**63 else rax
        if nr > 6:
            assert signed == -errno.ENOSYS
        elif signed < 0:
            assert -signed in (errno.EFAULT, errno.EINVAL)


def test_guest_memory_error_is_not_a_user_error(kvm):
    with (
        Machine(MachineConfig(mode="long", memory=MEM), kvm=kvm) as m,
        pytest.raises(GuestMemoryError),
    ):
        m.memory.read(NOT_RAM, 1)


def test_the_fast_path_knows_which_line_writes_a_result():
    # A failure on that line is the result's (None, not an int), anywhere else the handler's;
    # the fast path tells them apart by line so that it needs one try and no extra work.
    import inspect

    from kvmpy.hv.kvm import vcpu

    source, first = inspect.getsourcelines(vcpu.KvmVcpu._loop)
    lines = [first + i for i, text in enumerate(source) if "u64[rax] = result & mask64" in text]
    assert frozenset(lines) == vcpu._RESULT_LINES and len(lines) == 1


def test_a_c_function_that_raises_is_a_handler_failure(kvm):
    # max(ctx, a0, ...) raises TypeError from C, with no Python frame of its own: the
    # traceback's line is then the call's, not the result's.
    result, _ = call(kvm, 16, handler=max)
    assert result.stop_reason is StopReason.VMM_ERROR
    assert "handler raised TypeError" in result.message

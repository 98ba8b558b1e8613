"""The unicorn backend against hostile guests and files: random guest code, random descriptor
tables and stacks under exception delivery, random I/O instruction bytes, malformed saved state.
The VM may stop; the VMM never fails (no `vmm_error` stop, no exception out of run())."""

from __future__ import annotations

import base64
import ctypes as C
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.hv.unicorn.vcpu import StateError, decode_io
from kvmpy.kvm import structs as S
from kvmpy.loader import load_raw
from kvmpy.result import StopReason

from .unicorn_harness import Harness

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@given(st.binary(min_size=0, max_size=20), st.sampled_from([16, 32, 64]))
@settings(max_examples=500, deadline=None)
def test_decode_io_takes_any_bytes(code, bits):
    insn = decode_io(code, bits)
    if insn is not None:
        assert 1 <= insn.length <= 16


def _run_random(mode: str, code: bytes, setup=None):
    with Harness(mode, "4M") as h:
        h.load(load_raw(code + b"\xf4"))
        if setup is not None:
            setup(h)
        threading_stop = threading.Timer(
            2.0, h.vcpu.request_stop, kwargs={"reason": StopReason.TIMEOUT, "kick": True}
        )
        threading_stop.start()
        try:
            for _ in range(50):
                stop = h.vcpu.run()
                if stop is not None:
                    break
        finally:
            threading_stop.cancel()
        assert stop is not None
        assert stop.reason is not StopReason.VMM_ERROR, stop.message
        return stop


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.sampled_from(["real", "protected", "long",
                                                            "long-user"]))  # fmt: skip
def test_random_guest_code_never_breaks_the_vmm(code, mode):
    _run_random(mode, code)


@FUZZ
@given(
    st.binary(min_size=16 * 32, max_size=16 * 32),
    st.binary(min_size=64, max_size=64),
    st.sampled_from(["protected", "long", "long-user"]),
)
def test_delivery_through_garbage_tables_is_a_fault_or_a_shutdown(idt, gdt, mode):
    """The guest scribbled over its IDT and GDT and then faults: delivery must end in a
    guest-visible outcome (a handler, a double fault, a triple fault), never a VMM error."""

    def scribble(h):
        h.memory.write(h.layout.idt, idt)
        h.memory.write(h.layout.gdt + 8, gdt)

    _run_random(mode, b"\x0f\x0b", scribble)  # ud2


@FUZZ
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_exceptions_with_any_stack_pointer(rsp, ist):
    """#UD with RSP (and the TSS's IST1 stack) pointing anywhere, RAM or not."""

    def setup(h):
        regs = h.vcpu.get_regs()
        regs.rsp = rsp
        h.vcpu.set_regs(regs)
        h.memory.write_u64(h.layout.tss + 36, ist)

    _run_random("long-user", b"\x0f\x0b", setup)


def _b64(n: int, fill: int = 0) -> str:
    return base64.b64encode(bytes([fill]) * n).decode()


@given(
    st.dictionaries(
        st.sampled_from(["regs", "sregs", "fpu", "msrs", "debugregs", "vcpu_events", "xsave"]),
        st.one_of(
            st.text(max_size=20), st.integers(), st.lists(st.integers(), max_size=3),
            st.lists(st.lists(st.integers(-5, 1 << 65), max_size=3), max_size=3),
            st.sampled_from([_b64(C.sizeof(S.kvm_regs)), _b64(C.sizeof(S.kvm_sregs), 0xFF),
                             _b64(C.sizeof(S.kvm_fpu)), _b64(7)]),
        ),
    )
)  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_restore_state_refuses_malformed_state_with_one_error(state):
    with Harness("long", "4M") as h:
        try:
            h.vcpu.restore_state(state)
        except StateError:
            pass


def test_an_all_ones_sregs_state_still_leaves_a_working_vmm():
    state = {
        "regs": _b64(C.sizeof(S.kvm_regs), 0xFF),
        "sregs": _b64(C.sizeof(S.kvm_sregs), 0xFF),
        "fpu": _b64(C.sizeof(S.kvm_fpu), 0xFF),
        "msrs": [],
    }
    with Harness("long", "4M") as h:
        h.vcpu.restore_state(state)
        stop = h.vcpu.run()
        assert stop is not None and stop.reason is not StopReason.VMM_ERROR, stop.message


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

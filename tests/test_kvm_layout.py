"""Every structure size, field offset and ioctl number kvmpy uses, checked against <linux/kvm.h>.

A C program is generated from `kvmpy.kvm.structs.LAYOUT_CHECKS` and `constants.IOCTLS`, compiled
with the host's gcc and headers, and its output compared with ctypes.
"""

from __future__ import annotations

import ctypes as C
import shutil
import subprocess

import pytest

from kvmpy.kvm import constants as K
from kvmpy.kvm import structs as S

# Python names for anonymous C unions: the path drops the Python-only name.
ANONYMOUS = {("kvm_run", "u")}


def _paths(cls, prefix="", base=0, owner=None):
    """Yield (c_path, offset, size) for every field, recursing into nested structs/unions."""
    owner = owner or cls.__name__
    for name, ftype, *_ in cls._fields_:
        field = getattr(cls, name)
        offset = base + field.offset
        anonymous = (owner, name) in ANONYMOUS and not prefix
        path = prefix if anonymous else (f"{prefix}.{name}" if prefix else name)
        if not anonymous:
            yield path, offset, C.sizeof(ftype)
        if isinstance(ftype, type) and issubclass(ftype, C.Structure | C.Union):
            yield from _paths(ftype, path, offset, owner)


def _c_program() -> tuple[str, dict[str, int]]:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    expected: dict[str, int] = {}
    for name, cls in S.LAYOUT_CHECKS.items():
        key = f"sizeof {name}"
        expected[key] = C.sizeof(cls)
        lines.append(f'printf("%s %zu\\n", "{key}", sizeof(struct {name}));')
        for path, offset, size in _paths(cls):
            key = f"offsetof {name}.{path}"
            expected[key] = offset
            lines.append(f'printf("%s %zu\\n", "{key}", offsetof(struct {name}, {path}));')
            key = f"sizeof {name}.{path}"
            expected[key] = size
            lines.append(f'printf("%s %zu\\n", "{key}", sizeof(((struct {name} *)0)->{path}));')
    for name, value in K.IOCTLS.items():
        key = f"ioctl {name}"
        expected[key] = value
        lines.append(f'printf("%s %lu\\n", "{key}", (unsigned long){name});')
    for cap in K.Cap:
        key = f"cap KVM_CAP_{cap.name}"
        expected[key] = int(cap)
        lines.append(f'printf("%s %lu\\n", "{key}", (unsigned long)KVM_CAP_{cap.name});')
    for reason in K.ExitReason:
        key = f"exit KVM_EXIT_{reason.name}"
        expected[key] = int(reason)
        lines.append(f'printf("%s %lu\\n", "{key}", (unsigned long)KVM_EXIT_{reason.name});')
    for name in (
        "KVM_SYNC_X86_REGS", "KVM_SYNC_X86_SREGS", "KVM_SYNC_X86_EVENTS", "KVM_MEM_LOG_DIRTY_PAGES",
        "KVM_IOEVENTFD_FLAG_PIO", "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_DEASSIGN",
        "KVM_IRQFD_FLAG_DEASSIGN", "KVM_IRQ_ROUTING_MSI", "KVM_IRQ_ROUTING_IRQCHIP",
        "KVM_PIO_PAGE_OFFSET", "KVM_COALESCED_MMIO_PAGE_OFFSET", "KVM_DIRTY_LOG_PAGE_OFFSET",
        "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_HALTED", "KVM_DIRTY_GFN_F_DIRTY",
        "KVM_DIRTY_GFN_F_RESET", "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
        "KVM_INTERNAL_ERROR_EMULATION", "KVM_GUESTDBG_ENABLE", "KVM_GUESTDBG_SINGLESTEP",
        "KVM_GUESTDBG_USE_SW_BP", "KVM_GUESTDBG_USE_HW_BP", "KVM_MSR_EXIT_REASON_FILTER",
        "KVM_MSR_FILTER_READ", "KVM_MSR_FILTER_WRITE",
    ):  # fmt: skip
        key = f"const {name}"
        expected[key] = getattr(K, name)
        lines.append(f'printf("%s %lu\\n", "{key}", (unsigned long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n", expected


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to read <linux/kvm.h>")
def test_layout_matches_kernel_headers(tmp_path):
    source, expected = _c_program()
    (tmp_path / "layout.c").write_text(source)
    subprocess.run(
        ["gcc", "-std=gnu11", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True)
    actual = {}
    for line in out.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        actual[key] = int(value)
    mismatches = {k: (expected[k], actual.get(k)) for k in expected if expected[k] != actual.get(k)}
    assert not mismatches, f"ctypes vs C (python, C): {mismatches}"
    # Guard against the test silently checking nothing.
    assert len(expected) > 400
    assert "ioctl KVM_RUN" in expected and "offsetof kvm_run.s.regs.regs.rip" in expected

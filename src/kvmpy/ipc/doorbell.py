"""Doorbells between VMs (shm-irq), as QEMU's ivshmem-doorbell does them, on kvmpy.

Peer P rings vector V of peer Q by writing (Q << 16) | V to the doorbell port. In P's VM that
port carries one ioeventfd per (Q, V) with that value as its datamatch, so KVM signals the
eventfd without leaving the kernel. The same eventfd is an irqfd in Q's VM, routed to an MSI
(address 0xFEE00000 | dest APIC ID << 12, data = IDT vector), so KVM injects the interrupt
into Q's vCPU, again in the kernel. Neither VMM's Python sees a doorbell. A write that matches
no ioeventfd (a wrong peer or vector) exits to the VMM, which counts and drops it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..devices import Device
from ..errors import ConfigError
from .layout import MAX_VECTORS, PORT_DOORBELL, VECTOR_BASE, WAIT_GATE_VECTOR


def doorbell_value(peer: int, vector: int) -> int:
    return (peer << 16) | vector


def wire(
    machine,
    incoming: Sequence[int],
    outgoing: Mapping[int, Sequence[int]],
    irq_cpu: int = 0,
) -> list:
    """Connect `machine` to its peers' doorbells.

    `incoming[v]` is the eventfd that raises this VM's vector v on vCPU `irq_cpu` (an irqfd
    here, through an MSI the machine's interrupt owner routes); `outgoing[q][v]` the eventfd
    that raises peer q's vector v (an ioeventfd here). Returns the interrupt lines."""
    if not 0 < len(incoming) <= MAX_VECTORS:
        raise ConfigError(f"a peer has 1 to {MAX_VECTORS} doorbell vectors (got {len(incoming)})")
    if not 0 <= irq_cpu < machine.config.vcpus:
        raise ConfigError(
            f"--irq-cpu {irq_cpu} is not a vCPU of this VM (it has {machine.config.vcpus})"
        )
    lines = []
    for v, fd in enumerate(incoming):
        line = machine.interrupts.msi(f"ipc-doorbell{v}", vector=VECTOR_BASE + v, cpu=irq_cpu)
        line.attach_eventfd(fd)
        lines.append(line)
    for q, fds in outgoing.items():
        if not 0 <= q <= 0xFFFF:
            raise ConfigError(f"peer ID {q} is outside 0..65535")
        for v, fd in enumerate(fds):
            machine.ioeventfd(PORT_DOORBELL, 4, doorbell_value(q, v), pio=True, fd=fd)
    return lines


def install_handlers(machine, vectors: int) -> None:
    """Point the doorbell vectors and the wait gate at the guest's kvmpy/ipc.h handlers."""
    symbols = machine.image.symbols if machine.image is not None else {}
    names = [f"kvmpy_ipc_irq_vec{v}" for v in range(vectors)] + ["kvmpy_ipc_wait_gate"]
    missing = [n for n in names if n not in symbols]
    if missing:
        raise ConfigError(
            f"the guest image lacks {', '.join(missing)}: build it with the SDK and include "
            "<kvmpy/ipc.h> to use shm-irq"
        )
    for v in range(vectors):
        machine.set_interrupt_handler(VECTOR_BASE + v, symbols[f"kvmpy_ipc_irq_vec{v}"])
    machine.set_interrupt_handler(WAIT_GATE_VECTOR, symbols["kvmpy_ipc_wait_gate"], dpl=3)


class DoorbellPort(Device):
    """The doorbell port's writes that no ioeventfd took: wrong peer or vector. Dropped,
    counted (with pio and shm-poll, where no doorbell is wired, every write lands here).
    A read returns this VM's peer ID, like ivshmem's IVPosition register."""

    name = "ipc-doorbell"

    def __init__(self, peer_id: int = 0) -> None:
        self.peer_id = peer_id
        self.unmatched = 0

    def read(self, offset: int, size: int) -> bytes:
        return self.peer_id.to_bytes(4, "little")[:size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes):
        self.unmatched += 1
        return None

"""Snapshot a machine to a directory; restore one, eagerly or lazily, in this process.

info = take(machine, "snap/")          # the vCPU paused (VmSession.call_paused does that)
r = restore("snap/", lazy=True)        # a new Machine, ready to run where it stopped
r.mark_first_run(); result = r.machine.run(); print(r.report())
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..kvm import Kvm
from ..machine import Machine, ram_layout
from ..memory import PAGE_SIZE
from ..result import StopReason
from ..vmm import builder
from . import format, lazy, memfile, state
from .errors import SnapshotError
from .handler import HandlerProcess


def take(
    machine: Machine, path: str | os.PathLike, store: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write a snapshot of `machine` (vCPU paused, pending I/O completed) to `path`; with
    `store`, its memory goes into that page store (store.py), shared with other snapshots."""
    t0 = time.perf_counter()
    lazy.settle(machine.memory)
    # Device I/O threads write guest RAM on their own: they hold still while the state and
    # memory are written, so the two agree.
    with state.devices_quiesced(machine):
        st = state.capture(machine)
        t_state = time.perf_counter()
        res = format.write(path, st, machine.memory, store=store)
    total = (time.perf_counter() - t0) * 1e3
    extra = {"store": res.store} if res.store is not None else {}
    return {
        "path": str(Path(path).resolve()),
        "snapshot_ms": round(total, 3),
        "state_ms": round((t_state - t0) * 1e3, 3),
        **res.timings_ms,
        "memory_bytes": res.memory_bytes,
        "disk_bytes": res.disk_bytes,
        "pages_written": res.pages_written,
        "pages_total": res.memory_bytes // PAGE_SIZE,
        "extents": res.extents,
        "output_bytes": machine.output_bytes,
        **extra,
    }


@dataclass
class Restored:
    """A machine brought back from a snapshot, and how that went."""

    machine: Machine
    snapshot: format.Snapshot
    loader: lazy.LazyLoader | None
    started_ns: int  # time.monotonic_ns() when restore() began
    info: dict[str, Any] = field(default_factory=dict)
    first_run_ns: int | None = None

    @property
    def failure(self) -> str | None:
        """Why a lazy restore stopped the VM (damaged memory, a dead handler), or None."""
        return self.loader.failure if self.loader is not None else None

    def mark_first_run(self) -> None:
        """Call just before the first KVM_RUN: the end of the restore proper."""
        if self.first_run_ns is None:
            self.first_run_ns = time.monotonic_ns()

    def report(self) -> dict[str, Any]:
        d = dict(self.info)
        if self.first_run_ns is not None:
            d["restore_to_first_instruction_ms"] = round(
                (self.first_run_ns - self.started_ns) / 1e6, 3
            )
        if self.loader is not None:
            s = self.loader.stats()
            first = s.pop("first_fault_ns")
            ready = s.pop("handler_ready_ns")
            d.update(s)
            if ready:  # negative: the handler was waiting before the restore began
                d["handler_ready_ms"] = round((ready - self.started_ns) / 1e6, 3)
            d["pages_loaded"] = s["pages_copied"] + s["pages_zeroed"]
            if first:
                d["first_fault_served_ms"] = round((first - self.started_ns) / 1e6, 3)
        return d

    def close(self) -> None:
        if self.loader is not None:
            # Counters outlive the handler: they are in a page this process maps.
            self.info.update(self.report())
            self.loader.close()
        self.snapshot.close()
        self.machine.close()


def restore(
    path: str | os.PathLike,
    *,
    lazy_memory: bool = False,
    kvm: Kvm | None = None,
    console: Callable[[bytes], None] | BinaryIO | None = None,
    capture_output: bool = True,
    setup: Callable[[Machine], None] | None = None,
    handler: HandlerProcess | None = None,
    accel: str | None = None,
    lazy_background: bool = True,
) -> Restored:
    """Build a machine from the snapshot at `path` and put its state back.

    Eagerly, all of guest RAM is read (and checked) before this returns; with `lazy_memory`,
    RAM starts empty and a page-fault handler brings each chunk in when it is first touched.
    The machine is rebuilt from the snapshot's VmConfig, devices included; `setup(machine)`
    runs before the state is applied: add there the devices only user code knows (kinds not
    registered with kvmpy.devices.registry), whose state the snapshot holds but not code.
    `handler`, for a lazy restore,
    is a page-fault handler process started beforehand (`HandlerProcess.start()`), so it is
    ready when the VM starts; without one, one is started here and the first fault waits
    for it. `accel` picks the CPU backend (default: the snapshot's, or unicorn for a KVM
    snapshot where /dev/kvm is not usable). `lazy_background=False` keeps the handler from
    checking and loading the rest of memory between faults (every page then comes in on first
    touch; tests count faults so). A lazy restore whose memory turns out damaged stops the VM:
    `Restored.failure` says why."""
    t0 = time.monotonic_ns()
    snap = format.open_snapshot(path)
    machine = loader = None
    try:
        state.check_version(snap.state)
        config = state.config_from_dict(snap.state.get("config"))
        if accel is not None:
            config = state.with_accel(config, accel)
        ram = sum(size for _, size in ram_layout(config.machine.memory))  # type: ignore[arg-type]
        if ram != snap.memory_size:
            raise SnapshotError(
                f"{path}: the memory file holds {snap.memory_size} bytes but the machine "
                f"configuration needs {ram}"
            )
        machine = builder.build(
            config, load=False, kvm=kvm, console=console, capture_output=capture_output,
            setup=setup,
        )  # fmt: skip
        t_mem = time.monotonic_ns()
        if lazy_memory:
            m = machine

            def stop_vm(message: str) -> None:
                m.request_stop(StopReason.VMM_ERROR, message)

            loader = lazy.LazyLoader(machine.memory, snap, on_error=stop_vm, process=handler,
                                     background=lazy_background)  # fmt: skip
            handler = None  # the loader owns it now
            loaded = 0
        elif snap.located is not None:
            from .store import read_memory

            loaded = read_memory(machine.memory, snap.located, snap.store)
        else:
            loaded = memfile.read_memory(machine.memory, snap.memory_fd, snap.extents)
        t_state = time.monotonic_ns()
        state.apply(machine, snap.state)
        t_end = time.monotonic_ns()
    except BaseException:
        if handler is not None:
            handler.close()
        if loader is not None:
            loader.close()
        if machine is not None:
            machine.close()
        snap.close()
        raise
    info = {
        "snapshot": str(Path(path).resolve()),
        "lazy": lazy_memory,
        "pages_total": snap.memory_size // PAGE_SIZE,
        "pages_in_snapshot": snap.pages_written,
        **({"store": str(snap.store)} if snap.store is not None else {}),
        "pages_faulted": 0,
        "pages_loaded": loaded,
        "open_ms": round((t_mem - t0) / 1e6, 3),
        "memory_ms": round((t_state - t_mem) / 1e6, 3),
        "state_ms": round((t_end - t_state) / 1e6, 3),
        "output_bytes_before": machine.output_bytes,
    }
    if not lazy_memory:
        snap.close()
    return Restored(machine, snap, loader, t0, info)

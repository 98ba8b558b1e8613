"""VmConfig -> a ready Machine (Firecracker's builder): the machine, its devices in the order
the config lists them, then the boot source."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from .config import ImageBoot, LinuxBoot, VmConfig

if TYPE_CHECKING:
    from ..hv.base import Hypervisor
    from ..kvm import Kvm
    from ..machine import Machine


def build(
    config: VmConfig,
    *,
    load: bool = True,
    kvm: Kvm | None = None,
    hypervisor: Hypervisor | None = None,
    console: Callable[[bytes], None] | BinaryIO | None = None,
    capture_output: bool = True,
    setup: Callable[[Machine], None] | None = None,
) -> Machine:
    """Build the machine `config` describes. With `load=False` the boot source is recorded
    but not loaded (a restore puts memory and registers back instead). `setup(machine)`
    runs after the config's devices: the place for devices only user code knows."""
    from ..machine import Machine

    config = config.validated()
    linux = isinstance(config.boot, LinuxBoot)
    if linux:
        from . import linux as L

        config = L.with_platform_devices(config)
    m = Machine(config.machine, kvm=kvm, hypervisor=hypervisor, console=console,
                capture_output=capture_output)  # fmt: skip
    try:
        if linux:
            # Before the devices: CPUID, the software-host hooks, where virtio-mmio IRQs go.
            L.attach(m, config.boot)
        for d in config.devices:
            m.add_device(d.kind, d.id, **dict(d.args))
        m.boot_source = config.boot
        if setup is not None:
            setup(m)
        if load and config.boot is not None:
            load_boot_source(m, config.boot)
    except BaseException:
        m.close()
        raise
    return m


def load_boot_source(m: Machine, boot: Any) -> None:
    if isinstance(boot, ImageBoot):
        m.load_file(boot.path, boot.load_addr, boot.entry)
    elif isinstance(boot, LinuxBoot):
        from .linux import load

        load(m, boot)
    else:  # pragma: no cover - BootSource is a closed union
        raise TypeError(boot)
    m.boot_source = boot

"""A minimal VmOps for driving the unicorn backend without Machine: guest memory, the boot state
of a CPU mode, the buses and the hypercall table, as Machine assembles them."""

from __future__ import annotations

from kvmpy.arch.x86 import modes
from kvmpy.arch.x86.modes import Mode
from kvmpy.bus import MmioBus, PortBus
from kvmpy.devices.debugcon import PORT as DEBUGCON_PORT
from kvmpy.devices.debugcon import DebugConsole
from kvmpy.hv.unicorn import UnicornHypervisor
from kvmpy.hypercalls import PORT as HYPERCALL_PORT
from kvmpy.hypercalls import Hypercalls
from kvmpy.kvm import structs as S
from kvmpy.loader import Image, load_file
from kvmpy.machine import HypercallPort, ram_layout
from kvmpy.memory import GuestMemory, parse_size
from kvmpy.result import Stop


class Harness:
    def __init__(self, mode: Mode | str = Mode.LONG, memory: str | int = "64M"):
        self.mode = Mode.parse(mode) if isinstance(mode, str) else mode
        self.memory = GuestMemory()
        self.pio_bus = PortBus()
        self.mmio_bus = MmioBus()
        self.hypercalls = Hypercalls()
        self.layout = None
        self.entry_ip = 0
        self.output = bytearray()
        self.effects: list = []
        for i, (gpa, size) in enumerate(ram_layout(parse_size(memory))):
            self.memory.add_region(gpa, size, name=f"ram{i}")
        self.hv = UnicornHypervisor()
        self.vm = self.hv.create_vm()
        for region in self.memory:
            self.vm.map_memory(region)
        self.vcpu = self.vm.create_vcpu(0, self)
        self.pio_bus.register(DEBUGCON_PORT, 1, DebugConsole())
        self.pio_bus.register(HYPERCALL_PORT, 4, HypercallPort())

    # VmOps
    def console_write(self, data: bytes) -> None:
        self.output += data

    def apply_effect(self, effect, vcpu: int) -> None:
        self.effects.append(effect)

    def load(self, image: Image, reserved=()) -> None:
        image.place(self.memory)
        boot = modes.build(self.mode, self.memory, image.entry, [*image.ranges(), *reserved],
                           use_1g_pages=True)  # fmt: skip
        self.boot = boot
        self.layout = boot.layout
        self.entry_ip = boot.regs.rip
        self.vcpu.set_sregs(boot.sregs)
        self.vcpu.set_regs(boot.regs)
        self.vcpu.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))

    def load_file(self, path) -> Image:
        image = load_file(path)
        self.load(image)
        return image

    def run(self) -> Stop:
        while True:
            stop = self.vcpu.run()
            if stop is not None:
                return stop

    def close(self) -> None:
        self.vm.close()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""`VmConfig`: one JSON-able description of a whole machine.

    {"machine": {"mode": "long-user", "memory": 67108864, "vcpus": 2, "irqchip": true, ...},
     "boot":    {"kind": "image", "path": "guest.elf"}
              | {"kind": "linux", "kernel": "vmlinux", "initrd": "rootfs.cpio", "cmdline": "..."},
     "devices": [{"kind": "virtio-blk", "id": "vda", "args": {"path": "disk.img"}}, ...]}

The CLI builds one from its flags (`kvmpy run --dump-config` prints it, `kvmpy run --config
FILE.json` runs one), a snapshot records it, and `kvmpy restore` rebuilds the machine from it,
devices included, through `vmm/builder.py`. Devices are built by kind from the device registry
(devices/registry.py), with their construction arguments as given here.

Everything read from a file is validated here with one clear error per problem: a config file
is user input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.x86.modes import MAX_CPUS, Mode
from ..errors import ConfigError
from ..memory import PAGE_SIZE, parse_size

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: A config file larger than this is not a config file.
MAX_CONFIG_BYTES = 1 << 20


MAX_MEMORY = 1 << 40
MIN_MEMORY = 1 << 20

#: Backends `MachineConfig.accel` names ("auto": KVM when /dev/kvm is usable, else unicorn).
ACCELS = ("kvm", "unicorn", "auto")


def check_memory_size(memory: int | str) -> int:
    """A guest RAM size in bytes, or ConfigError if it is not one a machine can have."""
    size = parse_size(memory)
    if size < MIN_MEMORY:
        raise ConfigError(f"guest memory must be at least 1M (got {memory})")
    if size > MAX_MEMORY:
        raise ConfigError(f"guest memory must be at most 1T (got {memory})")
    if size % PAGE_SIZE:
        raise ConfigError(f"guest memory must be a multiple of 4K (got {memory})")
    return size


@dataclass(frozen=True)
class MachineConfig:
    mode: Mode | str = Mode.LONG
    memory: int | str = "64M"
    #: vCPUs, each in its own host thread. SMP machines always have the in-kernel irqchip
    #: (IPIs, and `hlt` that sleeps until one arrives).
    vcpus: int = 1
    #: In-kernel LAPIC/IOAPIC/PIC. With it, `hlt` sleeps in the kernel instead of stopping the VM.
    irqchip: bool = False
    #: In-kernel PIT (needs irqchip).
    pit: bool = False
    name: str = "vm"
    #: The CPU backend: "kvm", "unicorn" (binary translation, docs/backends.md), or "auto":
    #: KVM, and unicorn with a one-line notice where /dev/kvm is not usable. A machine's
    #: config names the backend it got.
    accel: str = "auto"
    #: Guest RAM is private anonymous memory marked MADV_MERGEABLE, so the host's KSM may
    #: merge identical pages (docs/memory.md). It does not start KSM: `kvmpy ksm on` does.
    mergeable: bool = False

    def validated(self) -> MachineConfig:
        mode = Mode.parse(self.mode) if isinstance(self.mode, str) else self.mode
        size = check_memory_size(self.memory)
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int):
            raise ConfigError(f"the vCPU count must be an integer (got {self.vcpus!r})")
        if not 1 <= self.vcpus <= MAX_CPUS:
            raise ConfigError(f"a machine has 1 to {MAX_CPUS} vCPUs (got {self.vcpus})")
        if self.pit and not self.irqchip:
            raise ConfigError("the in-kernel PIT needs the in-kernel irqchip (irqchip=True)")
        if self.accel not in ACCELS:
            raise ConfigError(
                f"unknown accelerator {self.accel!r}: choose one of {', '.join(ACCELS)}"
            )
        if not isinstance(self.mergeable, bool):
            raise ConfigError(f"mergeable must be true or false (got {self.mergeable!r})")
        irqchip = self.irqchip or self.vcpus > 1
        return MachineConfig(
            mode, size, self.vcpus, irqchip, self.pit, self.name, self.accel, self.mergeable
        )

    def to_dict(self) -> dict[str, Any]:
        c = self.validated()
        return {
            "mode": Mode(c.mode).value,
            "memory": c.memory,
            "vcpus": c.vcpus,
            "irqchip": c.irqchip,
            "pit": c.pit,
            "name": c.name,
            "accel": c.accel,
            "mergeable": c.mergeable,
        }


@dataclass(frozen=True)
class ImageBoot:
    """A kvmpy image (raw or ELF, e.g. built with the SDK)."""

    path: str
    load_addr: int | None = None
    entry: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "image", "path": self.path}
        if self.load_addr is not None:
            d["load_addr"] = self.load_addr
        if self.entry is not None:
            d["entry"] = self.entry
        return d


#: A Linux guest's RAM unless told (`kvmpy boot --mem`): Firecracker's default. On a software
#: host every MiB costs boot time (struct-page init and freeing run as emulated ring-0 code,
#: ~8% of a sampled 256 MiB boot), and kvmpy's busybox guest needs far less.
DEFAULT_LINUX_MEMORY = "128M"


@dataclass(frozen=True)
class LinuxBoot:
    """A Linux kernel (ELF vmlinux or bzImage) with an optional initrd and command line.

    `cmdline` is what the user adds (`kvmpy boot --append`): kvmpy puts its platform's own
    switches (console, the software-host profile, virtio-mmio devices) before it, so the user's
    come last and win. `acpi` and `mptable` say which firmware tables describe the machine
    (docs/linux.md: ACPI is what makes `poweroff` work; without either table Linux runs the
    8259 in virtual-wire mode on one CPU). `speed_cmdline`: on a software host, add the
    speed-only switches (`boot.swhost.speed_cmdline`: `rodata=off`, and Debian's
    `initcall_blacklist` for a Debian kernel)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    acpi: bool = True
    mptable: bool = True
    speed_cmdline: bool = True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "linux", "kernel": self.kernel, "cmdline": self.cmdline}
        if self.initrd is not None:
            d["initrd"] = self.initrd
        if not self.acpi:
            d["acpi"] = False
        if not self.mptable:
            d["mptable"] = False
        if not self.speed_cmdline:
            d["speed_cmdline"] = False
        return d


BootSource = ImageBoot | LinuxBoot


@dataclass(frozen=True)
class DeviceConfig:
    kind: str
    id: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "args": dict(self.args)}


@dataclass(frozen=True)
class VmConfig:
    machine: MachineConfig = field(default_factory=MachineConfig)
    boot: BootSource | None = None
    devices: tuple[DeviceConfig, ...] = ()

    def validated(self) -> VmConfig:
        machine = self.machine.validated()
        if isinstance(self.boot, LinuxBoot) and not (machine.irqchip and machine.pit):
            # Linux takes its interrupts, timers and SMP start-up from the in-kernel LAPIC,
            # IOAPIC, 8259 and PIT: a Linux machine always has them.
            machine = MachineConfig(machine.mode, machine.memory, machine.vcpus, True, True,
                                    machine.name, machine.accel)  # fmt: skip
        seen: set[str] = set()
        for d in self.devices:
            if not _ID.match(d.id):
                raise ConfigError(
                    f"device id {d.id!r} must be 1-64 letters, digits, '_', '.' or '-'"
                )
            if d.id in seen:
                raise ConfigError(f"two devices have the id {d.id!r}")
            seen.add(d.id)
        return VmConfig(machine, self.boot, tuple(self.devices))

    def with_device(self, kind: str, id: str | None = None, **args: Any) -> VmConfig:
        """A copy with one more device (its id defaults to kind + a number)."""
        if id is None:
            n = sum(1 for d in self.devices if d.kind == kind)
            id = f"{kind}{n}"
        return VmConfig(self.machine, self.boot, (*self.devices, DeviceConfig(kind, id, args)))

    # --- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine.to_dict(),
            "boot": self.boot.to_dict() if self.boot is not None else None,
            "devices": [d.to_dict() for d in self.devices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any, *, base: Path | None = None) -> VmConfig:
        """Check and build. Relative paths are taken relative to `base` (a config file's
        directory), so a config file and its images can move together."""
        if not isinstance(d, dict):
            raise ConfigError("a VM config is a JSON object with 'machine', 'boot', 'devices'")
        unknown = sorted(set(d) - {"machine", "boot", "devices"})
        if unknown:
            raise ConfigError(f"a VM config has no field {unknown[0]!r}")
        machine = _machine(d.get("machine", {}))
        boot = _boot(d.get("boot"), base)
        raw = d.get("devices", [])
        if not isinstance(raw, list):
            raise ConfigError("'devices' must be a list")
        devices = tuple(_device(x, i) for i, x in enumerate(raw))
        return cls(machine, boot, devices).validated()

    @classmethod
    def from_json(cls, text: str, *, base: Path | None = None) -> VmConfig:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"the VM config is not valid JSON: {e}") from None
        return cls.from_dict(d, base=base)

    @classmethod
    def load(cls, path: str | Path) -> VmConfig:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read the VM config {p}: {e.strerror}") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a VM config")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text: not a VM config") from None
        return cls.from_json(text, base=p.resolve().parent)


def _machine(d: Any) -> MachineConfig:
    if not isinstance(d, dict):
        raise ConfigError("'machine' must be an object")
    fields = {"mode", "memory", "vcpus", "irqchip", "pit", "name", "accel", "mergeable"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(
            f"'machine' has no field {unknown[0]!r} (fields: {', '.join(sorted(fields))})"
        )
    types = {"mode": str, "memory": (int, str), "vcpus": int, "irqchip": bool, "pit": bool,
             "name": str, "accel": str, "mergeable": bool}  # fmt: skip
    for k, v in d.items():
        if isinstance(v, bool) and types[k] is not bool:
            raise ConfigError(f"machine.{k} has the wrong type")
        if not isinstance(v, types[k]):
            raise ConfigError(f"machine.{k} has the wrong type")
    return MachineConfig(**d).validated()


def _path(value: Any, what: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string")
    p = Path(value)
    if base is not None and not p.is_absolute():
        p = base / p
    return str(p)


def _opt_int(d: dict, key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"boot.{key} must be a non-negative integer")
    return v


def _boot(d: Any, base: Path | None) -> BootSource | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError("'boot' must be an object")
    kind = d.get("kind")
    if kind == "image":
        unknown = sorted(set(d) - {"kind", "path", "load_addr", "entry"})
        if unknown:
            raise ConfigError(f"an image boot source has no field {unknown[0]!r}")
        return ImageBoot(_path(d.get("path"), "boot.path", base), _opt_int(d, "load_addr"),
                         _opt_int(d, "entry"))  # fmt: skip
    if kind == "linux":
        known = {"kind", "kernel", "initrd", "cmdline", "acpi", "mptable", "speed_cmdline"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"a Linux boot source has no field {unknown[0]!r}")
        initrd = d.get("initrd")
        cmdline = d.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise ConfigError("boot.cmdline must be a string")
        flags = {}
        for key in ("acpi", "mptable", "speed_cmdline"):
            if key in d:
                if not isinstance(d[key], bool):
                    raise ConfigError(f"boot.{key} must be true or false")
                flags[key] = d[key]
        return LinuxBoot(
            _path(d.get("kernel"), "boot.kernel", base),
            None if initrd is None else _path(initrd, "boot.initrd", base),
            cmdline,
            **flags,
        )
    raise ConfigError(f"boot.kind must be 'image' or 'linux' (got {kind!r})")


def _device(d: Any, i: int) -> DeviceConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"devices[{i}] must be an object")
    unknown = sorted(set(d) - {"kind", "id", "args"})
    if unknown:
        raise ConfigError(f"devices[{i}] has no field {unknown[0]!r}")
    kind, id_, args = d.get("kind"), d.get("id"), d.get("args", {})
    if not isinstance(kind, str):
        raise ConfigError(f"devices[{i}].kind must be a string")
    if not isinstance(id_, str):
        raise ConfigError(f"devices[{i}].id must be a string")
    if not isinstance(args, dict):
        raise ConfigError(f"devices[{i}].args must be an object")
    return DeviceConfig(kind, id_, args)

"""A VM's configuration as Firecracker's API builds it up (machine-config, boot-source, drives,
...), and its translation to a kvmpy `VmConfig` (the machine, its boot source, devices of
registered kinds) at InstanceStart.

Each setter checks everything before it changes anything, so a refused request leaves the
configuration as it was. What kvmpy cannot honour is refused with a sentence that names it,
never ignored. Paths go through `PathPolicy` (relative to the daemon's directory, or confined
to `kvmpy serve --root DIR` like Firecracker's jailer chroot).
"""

from __future__ import annotations

import importlib.util
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KvmpyError
from ..vmm.config import DeviceConfig, ImageBoot, LinuxBoot, MachineConfig, VmConfig
from . import models as M
from .errors import ApiError

#: Firecracker's defaults (GET /machine-config before any PUT).
DEFAULT_MACHINE = M.MachineConfiguration(vcpu_count=1, mem_size_mib=128)
DEFAULT_WEIGHT = 100


def device_kinds() -> set[str]:
    from ..devices import registry

    return set(registry.kinds())


def linux_supported() -> bool:
    """Whether this kvmpy can boot Linux (the Linux boot source, kvmpy.boot.linux)."""
    return importlib.util.find_spec("kvmpy.boot.linux") is not None


def need_kind(kind: str, what: str, where: str) -> None:
    if kind not in device_kinds():
        raise ApiError(
            f"{what} need the {kind} device kind, which this kvmpy does not have yet ({where}); "
            f"kinds available: {', '.join(sorted(device_kinds()))}"
        )


class PathPolicy:
    """Host paths in requests: relative to `cwd`, or, with a root, inside it (a path given
    as absolute is taken relative to the root, and nothing may resolve outside it)."""

    def __init__(self, root: str | None = None, cwd: str | None = None):
        self.root = os.path.realpath(root) if root else None
        self.cwd = cwd or os.getcwd()

    def resolve(self, value: str, what: str) -> str:
        if self.root is None:
            return os.path.abspath(os.path.join(self.cwd, value))
        p = os.path.realpath(os.path.join(self.root, value.lstrip("/")))
        if p != self.root and not p.startswith(self.root + os.sep):
            raise ApiError(f"{what} {value!r} is outside the daemon's root {self.root}")
        return p

    def show(self, path: str) -> str:
        """A resolved path as the client knows it."""
        if self.root is None:
            return path
        rel = os.path.relpath(path, self.root)
        return "/" + ("" if rel == "." else rel)


def _existing_file(path: str, what: str, *, writable: bool = False) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ApiError(f"{what} {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ApiError(f"{what} {path} is not a regular file or block device")
    if not os.access(path, os.R_OK | (os.W_OK if writable else 0)):
        raise ApiError(f"{what} {path} is not {'writable' if writable else 'readable'}")


def kernel_kind(path: str) -> str:
    """ "linux" for a Linux kernel (bzImage, or a vmlinux ELF with Linux or Xen notes),
    "image" for anything else (a kvmpy SDK image, raw or ELF)."""
    with open(path, "rb") as f:
        head = f.read(0x210)
        if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
            return "linux"
        if head[:4] != b"\x7fELF":
            return "image"
        f.seek(0)
        try:
            from elftools.elf.elffile import ELFFile

            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    for note in seg.iter_notes():
                        if note["n_name"] in ("Linux", "Xen"):
                            return "linux"
        except Exception:  # a damaged ELF: the loader says what is wrong with it at start
            return "image"
    return "image"


@dataclass
class Resources:
    """One VM's configuration before it starts (and what it was started with)."""

    paths: PathPolicy = field(default_factory=PathPolicy)
    machine: M.MachineConfiguration = field(default_factory=lambda: DEFAULT_MACHINE)
    boot: M.BootSource | None = None
    boot_kind: str | None = None  # "image" or "linux"
    drives: dict[str, M.Drive] = field(default_factory=dict)
    nets: dict[str, M.NetworkInterface] = field(default_factory=dict)
    vsock: M.Vsock | None = None
    entropy: M.EntropyDevice | None = None
    balloon: M.Balloon | None = None
    logger: M.Logger | None = None
    metrics: M.Metrics | None = None
    #: Set by anything but the logger and metrics (snapshot/load needs a fresh VM).
    configured: bool = False

    # --- setters -------------------------------------------------------------------------

    def set_machine(self, m: M.MachineConfiguration) -> None:
        if m.smt:
            raise ApiError("smt: kvmpy gives vCPUs no SMT topology; smt must be false")
        if m.track_dirty_pages:
            raise ApiError(
                "track_dirty_pages: kvmpy has no diff snapshots (live migration tracks dirty "
                "pages by itself); it must be false"
            )
        if m.cpu_template not in (None, "None"):
            raise ApiError(f"cpu_template {m.cpu_template}: kvmpy has no CPU templates")
        if m.huge_pages not in (None, "None"):
            raise ApiError(
                f"huge_pages {m.huge_pages}: kvmpy backs guest memory with memfd 4 KiB pages; "
                "huge pages are not supported"
            )
        if m.mode is not None and self.boot_kind == "linux":
            raise ApiError("mode: a Linux kernel chooses its own CPU mode")
        try:
            self._machine_config(m).validated()
        except KvmpyError as e:
            raise ApiError(f"machine-config: {e}") from None
        self.machine = m
        self.configured = True

    def patch_machine(self, p: M.MachineConfigurationUpdate) -> None:
        given = p.model_dump(exclude_unset=True)
        merged = {**self.machine.model_dump(), **{k: v for k, v in given.items()}}
        for k in ("vcpu_count", "mem_size_mib"):
            if merged.get(k) is None:
                raise ApiError(f"machine-config: {k} cannot be null")
        for k in ("smt", "track_dirty_pages"):
            if merged.get(k) is None:
                merged[k] = False
        self.set_machine(M.MachineConfiguration.model_validate(merged))

    def set_boot(self, b: M.BootSource) -> None:
        kernel = self.paths.resolve(b.kernel_image_path, "kernel_image_path")
        _existing_file(kernel, "kernel_image_path")
        kind = kernel_kind(kernel)
        initrd = None
        if b.initrd_path is not None:
            initrd = self.paths.resolve(b.initrd_path, "initrd_path")
            _existing_file(initrd, "initrd_path")
        if kind == "linux":
            if not linux_supported():
                raise ApiError(
                    f"kernel_image_path {b.kernel_image_path} is a Linux kernel, and this kvmpy "
                    "cannot boot Linux yet (the Linux boot source, kvmpy.boot.linux, is not "
                    "part of it); an SDK image boots"
                )
            if self.machine.mode is not None:
                raise ApiError("a Linux kernel chooses its own CPU mode: unset machine-config mode")
        else:
            if initrd is not None:
                raise ApiError(
                    f"initrd_path: {b.kernel_image_path} is a kvmpy SDK image, not a Linux "
                    "kernel; SDK images take no initrd"
                )
            if b.boot_args and b.boot_args.strip():
                raise ApiError(
                    f"boot_args: {b.kernel_image_path} is a kvmpy SDK image, not a Linux "
                    "kernel; SDK images take no command line"
                )
        self.boot = M.BootSource(kernel_image_path=kernel, boot_args=b.boot_args,
                                 initrd_path=initrd)  # fmt: skip
        self.boot_kind = kind
        self.configured = True

    def put_drive(self, drive_id: str, d: M.Drive) -> None:
        if d.drive_id != drive_id:
            raise ApiError(f"the drive id in the path ({drive_id}) and in the body "
                           f"({d.drive_id}) differ")  # fmt: skip
        if d.socket is not None:
            raise ApiError("socket: kvmpy has no vhost-user block devices; give path_on_host")
        if d.path_on_host is None:
            raise ApiError("path_on_host is required")
        if d.rate_limiter is not None:
            raise ApiError("rate_limiter: kvmpy's block devices have no rate limiter")
        if d.io_engine == "Async":
            raise ApiError("io_engine Async: kvmpy's block device serves requests with "
                           "preadv/pwritev on its own I/O thread (Sync)")  # fmt: skip
        if d.is_root_device and any(
            o.is_root_device for k, o in self.drives.items() if k != drive_id
        ):
            raise ApiError("another drive is the root device already")
        if d.partuuid is not None and not d.is_root_device:
            raise ApiError("partuuid is for the root device only")
        if len(self.drives) >= 16 and drive_id not in self.drives:
            raise ApiError("a VM has at most 16 drives")
        path = self.paths.resolve(d.path_on_host, "path_on_host")
        _existing_file(path, "path_on_host", writable=not d.is_read_only)
        self.drives[drive_id] = d.model_copy(update={"path_on_host": path})
        self.configured = True

    def put_net(self, iface_id: str, n: M.NetworkInterface) -> None:
        if n.iface_id != iface_id:
            raise ApiError(f"the interface id in the path ({iface_id}) and in the body "
                           f"({n.iface_id}) differ")  # fmt: skip
        need_kind("virtio-net", "network interfaces", "issue 12, virtio-net")
        if n.rx_rate_limiter is not None or n.tx_rate_limiter is not None:
            raise ApiError(
                "rx_rate_limiter/tx_rate_limiter: kvmpy's virtio-net has no rate limiter"
            )
        if n.mtu is not None:
            raise ApiError("mtu: kvmpy's virtio-net does not advertise an MTU")
        from ..devices.virtio.net import parse_mac
        from ..devices.virtio.tap import check_ifname

        try:
            check_ifname(n.host_dev_name)
            if n.guest_mac is not None:
                parse_mac(n.guest_mac)
        except (KvmpyError, ValueError) as e:
            raise ApiError(f"{'guest_mac' if isinstance(e, ValueError) else 'host_dev_name'}: "
                           f"{e}") from None  # fmt: skip
        for other in self.nets.values():
            if other.iface_id == iface_id:
                continue
            # A TAP without multiqueue is opened by one device at a time; one MAC per link.
            if other.host_dev_name == n.host_dev_name:
                raise ApiError(f"host_dev_name {n.host_dev_name} is in use by interface "
                               f"{other.iface_id}")  # fmt: skip
            if (
                n.guest_mac
                and other.guest_mac
                and (parse_mac(other.guest_mac) == parse_mac(n.guest_mac))
            ):
                raise ApiError(f"guest_mac {n.guest_mac} is in use by interface {other.iface_id}")
        if len(self.nets) >= 8 and iface_id not in self.nets:
            raise ApiError("a VM has at most 8 network interfaces")
        self.nets[iface_id] = n
        self.configured = True

    def put_vsock(self, v: M.Vsock) -> None:
        need_kind("virtio-vsock", "vsock devices", "issue 12, virtio-vsock")
        uds = self.paths.resolve(v.uds_path, "uds_path")
        # sun_path holds 107 bytes, and guest connections to host port P go to uds_path_P.
        if len(os.fsencode(uds)) + len("_4294967295") > 107:
            raise ApiError(f"uds_path {v.uds_path}: too long for a Unix socket address with "
                           "a port suffix (at most 96 bytes as resolved)")  # fmt: skip
        parent = os.path.dirname(uds)
        if not os.path.isdir(parent):
            raise ApiError(f"uds_path {v.uds_path}: no such directory {self.paths.show(parent)}")
        if os.path.lexists(uds) and not stat.S_ISSOCK(os.lstat(uds).st_mode):
            raise ApiError(f"uds_path {v.uds_path} exists and is not a socket")
        self.vsock = v.model_copy(update={"uds_path": uds})
        self.configured = True

    def put_entropy(self, e: M.EntropyDevice) -> None:
        rate_of(e)  # refuses what the device cannot do
        self.entropy = e
        self.configured = True

    def put_balloon(self, b: M.Balloon) -> None:
        need_kind("virtio-balloon", "balloon devices", "issue 15, the balloon")
        if b.free_page_hinting:
            raise ApiError("free_page_hinting: kvmpy's balloon has no free page hinting")
        if b.free_page_reporting is False:
            raise ApiError("free_page_reporting: kvmpy's balloon always offers free page "
                           "reporting (the guest decides whether to use it)")  # fmt: skip
        if not b.deflate_on_oom:
            raise ApiError("deflate_on_oom: kvmpy's balloon always offers DEFLATE_ON_OOM (the "
                           "guest takes pages back under memory pressure); it must be true")  # fmt: skip
        if b.amount_mib > self.machine.mem_size_mib:
            raise ApiError(f"amount_mib {b.amount_mib} is more than the VM's memory "
                           f"({self.machine.mem_size_mib} MiB)")  # fmt: skip
        self.balloon = b
        self.configured = True

    def put_logger(self, lg: M.Logger) -> None:
        path = None
        if lg.log_path is not None:
            path = self.paths.resolve(lg.log_path, "log_path")
            _writable_target(path, "log_path")
        self.logger = lg.model_copy(update={"log_path": path})

    def put_metrics(self, mt: M.Metrics) -> None:
        path = self.paths.resolve(mt.metrics_path, "metrics_path")
        _writable_target(path, "metrics_path")
        self.metrics = M.Metrics(metrics_path=path)

    # --- to kvmpy ------------------------------------------------------------------------

    def _machine_config(self, m: M.MachineConfiguration, name: str = "vm") -> MachineConfig:
        return MachineConfig(
            mode=m.mode or "long",
            memory=m.mem_size_mib << 20,
            vcpus=m.vcpu_count,
            irqchip=bool(m.irqchip),
            name=name,
            accel=m.accel or "auto",
        )

    def vm_config(self, name: str) -> VmConfig:
        """The VmConfig to start (InstanceStart); ApiError says what is missing or wrong."""
        if self.boot is None:
            raise ApiError("InstanceStart needs a boot source first (PUT /boot-source)")
        m = self.machine
        machine = self._machine_config(m, name)
        if self.boot_kind == "image":
            from ..loader import load_file

            try:
                image = load_file(self.boot.kernel_image_path)
            except KvmpyError as e:
                raise ApiError(f"kernel_image_path: {e}") from None
            mode = m.mode or image.mode_hint or ("protected" if image.bits == 32 else "long")
            machine = MachineConfig(mode, machine.memory, machine.vcpus, machine.irqchip,
                                    False, name, machine.accel)  # fmt: skip
            boot: Any = ImageBoot(self.boot.kernel_image_path)
        else:
            args = self.boot.boot_args or ""
            root = next((d for d in self._drive_order() if d.is_root_device), None)
            if root is not None:
                # Firecracker's rule: the root drive is the first virtio disk.
                dev = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
                args = f"{args} root={dev} {'ro' if root.is_read_only else 'rw'}".strip()
            if m.console == "virtio" and "console=hvc0" not in args.split():
                # As `kvmpy boot --console virtio`: the shell on hvc0. Last, because Linux
                # makes the last console= its /dev/console, and the console WebSocket's input
                # goes to hvc0 then.
                args = f"{args} console=hvc0".strip()
            boot = LinuxBoot(self.boot.kernel_image_path, self.boot.initrd_path, args)
        transport = m.virtio_transport or "mmio"
        devices: list[DeviceConfig] = []
        for d in self._drive_order():
            devices.append(DeviceConfig("virtio-blk", d.drive_id, {
                "path": d.path_on_host, "readonly": bool(d.is_read_only),
                "serial": d.drive_id, "transport": transport}))  # fmt: skip
        for n in self.nets.values():
            args_: dict[str, Any] = {"tap": n.host_dev_name, "transport": transport}
            if n.guest_mac:
                args_["mac"] = n.guest_mac
            devices.append(DeviceConfig("virtio-net", n.iface_id, args_))
        if self.vsock is not None:
            devices.append(DeviceConfig("virtio-vsock", self.vsock.vsock_id or "vsock0", {
                "cid": self.vsock.guest_cid, "uds": self.vsock.uds_path,
                "transport": transport}))  # fmt: skip
        if self.entropy is not None:
            args_ = {"transport": transport}
            rate = rate_of(self.entropy)
            if rate:
                args_["rate"] = rate
            devices.append(DeviceConfig("virtio-rng", "rng0", args_))
        if self.balloon is not None:
            devices.append(DeviceConfig("virtio-balloon", "balloon0", {
                "transport": transport,
                "stats_interval": self.balloon.stats_polling_interval_s}))  # fmt: skip
        if m.console == "virtio":
            devices.append(DeviceConfig("virtio-console", "hvc0", {"transport": transport}))
        try:
            return VmConfig(machine, boot, tuple(devices)).validated()
        except KvmpyError as e:
            raise ApiError(str(e)) from None

    def _drive_order(self) -> list[M.Drive]:
        drives = list(self.drives.values())
        return [d for d in drives if d.is_root_device] + [d for d in drives if not d.is_root_device]

    # --- to Firecracker ------------------------------------------------------------------

    def full(self) -> dict[str, Any]:
        """GET /vm/config: Firecracker's FullVmConfiguration of what was configured."""
        p = self.paths.show
        boot = None
        if self.boot is not None:
            boot = self.boot.model_copy(update={
                "kernel_image_path": p(self.boot.kernel_image_path),
                "initrd_path": p(self.boot.initrd_path) if self.boot.initrd_path else None})  # fmt: skip
        cfg = M.FullVmConfiguration(
            balloon=self.balloon,
            drives=[d.model_copy(update={"path_on_host": p(d.path_on_host or "")})
                    for d in self.drives.values()],  # fmt: skip
            boot_source=boot,
            logger=self.logger.model_copy(update={"log_path": p(self.logger.log_path)})
            if self.logger and self.logger.log_path else self.logger,
            machine_config=self.machine,
            metrics=M.Metrics(metrics_path=p(self.metrics.metrics_path)) if self.metrics else None,
            network_interfaces=list(self.nets.values()),
            vsock=self.vsock.model_copy(update={"uds_path": p(self.vsock.uds_path)})
            if self.vsock else None,
            entropy=self.entropy,
        )  # fmt: skip
        return cfg.model_dump(by_alias=True, exclude_none=True)


def rate_of(e: M.EntropyDevice) -> int:
    """Bytes per second from Firecracker's bandwidth token bucket (0: unlimited)."""
    rl = e.rate_limiter
    if rl is None:
        return 0
    if rl.ops is not None:
        raise ApiError("rate_limiter.ops: kvmpy's entropy device limits bytes, not operations")
    b = rl.bandwidth
    if b is None:
        return 0
    if b.one_time_burst:
        raise ApiError("rate_limiter.bandwidth.one_time_burst: not supported by kvmpy")
    if b.size == 0 or b.refill_time == 0:
        raise ApiError("rate_limiter.bandwidth: size and refill_time must be positive")
    rate = b.size * 1000 // b.refill_time
    if not 1 <= rate <= 1 << 40:
        raise ApiError(f"rate_limiter.bandwidth: {rate} bytes/s is out of range")
    return rate


def _writable_target(path: str, what: str) -> None:
    """A log or metrics file or FIFO we may append to (created if missing)."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise ApiError(f"{what} {path}: no such directory {parent}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.access(parent, os.W_OK):
            raise ApiError(f"{what} {path}: cannot create it there") from None
        return
    except OSError as e:
        raise ApiError(f"{what} {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise ApiError(f"{what} {path} is not a regular file or a named pipe")
    if not os.access(path, os.W_OK):
        raise ApiError(f"{what} {path} is not writable")


def from_vm_config(cfg: VmConfig, paths: PathPolicy) -> Resources:
    """The Firecracker view of a VM that was not configured through the API (restored from a
    snapshot, received by migration): as far as its VmConfig maps onto Firecracker's model."""
    r = Resources(paths=paths)
    mc = cfg.machine
    r.machine = M.MachineConfiguration(
        vcpu_count=mc.vcpus, mem_size_mib=int(mc.memory) >> 20,
        mode=str(mc.mode.value if hasattr(mc.mode, "value") else mc.mode)
        if isinstance(cfg.boot, ImageBoot) else None,
        irqchip=mc.irqchip, accel=mc.accel,
    )  # fmt: skip
    transport = None
    for d in cfg.devices:
        a = dict(d.args)
        transport = transport or a.get("transport")
        if d.kind == "virtio-blk":
            r.drives[d.id] = M.Drive(drive_id=d.id, is_root_device=False,
                                     path_on_host=a.get("path", ""),
                                     is_read_only=bool(a.get("readonly")))  # fmt: skip
        elif d.kind == "virtio-net":
            r.nets[d.id] = M.NetworkInterface(iface_id=d.id, host_dev_name=a.get("tap", "?"),
                                              guest_mac=a.get("mac"))  # fmt: skip
        elif d.kind == "virtio-vsock":
            r.vsock = M.Vsock(guest_cid=a.get("cid", 3), uds_path=a.get("uds", "?"), vsock_id=d.id)
        elif d.kind == "virtio-rng":
            rate = a.get("rate") or 0
            r.entropy = M.EntropyDevice(
                rate_limiter=M.RateLimiter(bandwidth=M.TokenBucket(size=rate, refill_time=1000))
                if rate else None
            )  # fmt: skip
        elif d.kind == "virtio-balloon":
            # The target is the device's state, not its configuration: the VMM reports it
            # when it is ready (worker.py), and the daemon puts it here.
            r.balloon = M.Balloon(amount_mib=0, deflate_on_oom=True,
                                  stats_polling_interval_s=int(a.get("stats_interval", 0)))  # fmt: skip
        elif d.kind == "virtio-console":
            r.machine = r.machine.model_copy(update={"console": "virtio"})
    if transport:
        r.machine = r.machine.model_copy(update={"virtio_transport": transport})
    if isinstance(cfg.boot, ImageBoot):
        r.boot = M.BootSource(kernel_image_path=cfg.boot.path)
        r.boot_kind = "image"
    elif isinstance(cfg.boot, LinuxBoot):
        r.boot = M.BootSource(kernel_image_path=cfg.boot.kernel, initrd_path=cfg.boot.initrd,
                              boot_args=cfg.boot.cmdline)  # fmt: skip
        r.boot_kind = "linux"
    r.configured = True
    return r

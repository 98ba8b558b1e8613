"""The request and response bodies of the management API (pydantic models).

These classes are the one source of truth: FastAPI validates every request against them and
generates `/openapi.json` from them, and `kvmpy.client` builds its requests with them. The
Firecracker bodies keep Firecracker's names and types (its swagger, API 1.x); fields Firecracker
has and kvmpy cannot honour are declared too, so that a value kvmpy cannot honour is refused by
name instead of "unknown field" (docs/api.md lists each). kvmpy's own additions are marked
"kvmpy extension" in their descriptions.

Every model refuses unknown fields and is strict (no "1" for 1, no 1 for true), as
Firecracker's serde models are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..arch.x86.modes import MAX_CPUS

#: Ids of VMs, drives, interfaces: what a VmConfig device id may be, not starting with a dot
#: (a VM's id names its directory under the daemon's state directory: never "." or "..").
ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
#: A host path: not empty, no NUL byte (which no system call takes), bounded.
HostPath = Annotated[str, StringConstraints(min_length=1, max_length=4095, pattern=r"^[^\x00]+$")]
#: Bounded free text (command lines, MAC addresses, module names).
Text = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00]*$")]

MAX_MEM_MIB = 1 << 20  # 1 TiB, kvmpy.vmm.config.MAX_MEMORY
U64 = Annotated[int, Field(ge=0, le=(1 << 64) - 1)]
U32 = Annotated[int, Field(ge=0, le=(1 << 32) - 1)]

STATES = ("Not started", "Running", "Paused", "Stopped", "Crashed", "Migrated")
State = Literal["Not started", "Running", "Paused", "Stopped", "Crashed", "Migrated"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Error(Body):
    """Every error answer: one line saying what was wrong (Firecracker's format)."""

    fault_message: str


# --- Firecracker's bodies --------------------------------------------------------------------


class InstanceInfo(Body):
    app_name: str
    id: str
    state: State = Field(
        description="Not started, Running or Paused as in Firecracker; kvmpy extension: "
        "Stopped (the guest or a Stop action ended it), Crashed (its VMM process died), "
        "Migrated (it runs elsewhere now)"
    )
    vmm_version: str


class InstanceActionInfo(Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel", "Stop"] = Field(
        description="Stop is a kvmpy extension: stop the VM (its VMM process ends)"
    )


class TokenBucket(Body):
    size: U64
    refill_time: U64 = Field(description="milliseconds to refill the whole bucket")
    one_time_burst: U64 | None = None


class RateLimiter(Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(Body):
    kernel_image_path: HostPath = Field(
        description="a Linux kernel (bzImage or vmlinux) or a kvmpy SDK image (ELF or raw)"
    )
    boot_args: Text | None = None
    initrd_path: HostPath | None = None


CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
Mode = Literal["real", "protected", "paged32", "long", "long-user"]


class MachineConfiguration(Body):
    vcpu_count: int = Field(ge=1, le=MAX_CPUS)
    mem_size_mib: int = Field(ge=1, le=MAX_MEM_MIB)
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: CpuTemplate | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None
    # kvmpy extensions
    mode: Mode | None = Field(
        None,
        description="kvmpy extension: the CPU mode an SDK image runs in (default: the image's)",
    )
    irqchip: bool | None = Field(
        None, description="kvmpy extension: the in-kernel LAPIC/IOAPIC (always on with SMP)"
    )
    accel: Literal["kvm", "unicorn", "auto"] | None = Field(
        None, description="kvmpy extension: the CPU backend (default auto)"
    )
    virtio_transport: Literal["mmio", "pci"] | None = Field(
        None, description="kvmpy extension: the transport of every virtio device (default mmio)"
    )
    console: Literal["serial", "virtio"] | None = Field(
        None,
        description="kvmpy extension: virtio adds a virtio console whose input is the "
        "console WebSocket's (default serial: output only)",
    )


class MachineConfigurationUpdate(Body):
    """PATCH /machine-config: the fields given replace the current ones."""

    vcpu_count: int | None = Field(None, ge=1, le=MAX_CPUS)
    mem_size_mib: int | None = Field(None, ge=1, le=MAX_MEM_MIB)
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: CpuTemplate | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None
    mode: Mode | None = None
    irqchip: bool | None = None
    accel: Literal["kvm", "unicorn", "auto"] | None = None
    virtio_transport: Literal["mmio", "pci"] | None = None
    console: Literal["serial", "virtio"] | None = None


class Drive(Body):
    drive_id: Id
    is_root_device: bool
    partuuid: Text | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    is_read_only: bool | None = None
    path_on_host: HostPath | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    socket: HostPath | None = Field(None, description="vhost-user: not supported by kvmpy")


class PartialDrive(Body):
    drive_id: Id
    path_on_host: HostPath | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(Body):
    iface_id: Id
    host_dev_name: Annotated[str, StringConstraints(min_length=1, max_length=15)] = Field(
        description="the host TAP device"
    )
    guest_mac: Text | None = None
    mtu: int | None = Field(None, ge=68, le=65535)
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class PartialNetworkInterface(Body):
    iface_id: Id
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(Body):
    guest_cid: int = Field(ge=3, le=(1 << 32) - 2)
    uds_path: HostPath
    vsock_id: Text | None = None


class EntropyDevice(Body):
    rate_limiter: RateLimiter | None = None


class Balloon(Body):
    amount_mib: U32
    deflate_on_oom: bool
    stats_polling_interval_s: int = Field(0, ge=0, le=3600)
    free_page_hinting: bool | None = None
    free_page_reporting: bool | None = None


class BalloonUpdate(Body):
    amount_mib: U32


class BalloonStatsUpdate(Body):
    stats_polling_interval_s: int = Field(ge=0, le=3600)


#: The guest's memory statistics (virtio 5.5.6.3), by Firecracker's names.
BALLOON_STAT_NAMES = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
                      "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
                      "hugetlb_failures")  # fmt: skip


class BalloonStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    target_pages: int
    actual_pages: int
    target_mib: int
    actual_mib: int


class Logger(Body):
    level: (
        Annotated[str, StringConstraints(pattern=r"^(?i:error|warning|info|debug|trace|off)$")]
        | None
    ) = Field(None, description="Error, Warning, Info, Debug, Trace or Off (any case)")
    log_path: HostPath | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: Text | None = Field(None, description="only records of this logger and below")


class Metrics(Body):
    metrics_path: HostPath


class SnapshotCreateParams(Body):
    mem_file_path: HostPath = Field(
        description="made a hard link (else a symbolic link) to the snapshot's memory file"
    )
    snapshot_path: HostPath = Field(
        description="the kvmpy snapshot directory (manifest, state, memory index, memory)"
    )
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: HostPath


class NetworkOverride(Body):
    iface_id: Id
    host_dev_name: Annotated[str, StringConstraints(min_length=1, max_length=15)]


class VsockOverride(Body):
    uds_path: HostPath


class SnapshotLoadParams(Body):
    snapshot_path: HostPath
    mem_file_path: HostPath | None = None
    mem_backend: MemoryBackend | None = None
    enable_diff_snapshots: bool | None = None
    track_dirty_pages: bool | None = None
    resume_vm: bool | None = None
    network_overrides: list[NetworkOverride] | None = Field(None, max_length=64)
    vsock_override: VsockOverride | None = None
    clock_realtime: bool | None = None
    lazy: bool | None = Field(
        None,
        description="kvmpy extension: bring memory in on first touch (userfaultfd, kvmpy's "
        "own handler process)",
    )


class Vm(Body):
    state: Literal["Paused", "Resumed"]


class FirecrackerVersion(Body):
    firecracker_version: str = Field(description="the Firecracker API level kvmpy follows")
    kvmpy_version: str = Field(description="kvmpy extension")


class FullVmConfiguration(Body):
    """Firecracker's --config-file format and GET /vm/config."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    balloon: Balloon | None = None
    drives: list[Drive] = Field(default_factory=list, max_length=64)
    boot_source: BootSource | None = Field(None, alias="boot-source")
    cpu_config: dict[str, Any] | None = Field(
        None, alias="cpu-config", description="not supported by kvmpy: must be absent or null"
    )
    logger: Logger | None = None
    machine_config: MachineConfiguration | None = Field(None, alias="machine-config")
    metrics: Metrics | None = None
    mmds_config: dict[str, Any] | None = Field(
        None, alias="mmds-config", description="not supported by kvmpy: must be absent or null"
    )
    network_interfaces: list[NetworkInterface] = Field(
        default_factory=list, alias="network-interfaces", max_length=64
    )
    vsock: Vsock | None = None
    entropy: EntropyDevice | None = None


# --- kvmpy extensions ------------------------------------------------------------------------


class MigrateParams(Body):
    destination: Annotated[str, StringConstraints(min_length=3, max_length=300)] = Field(
        description="HOST:PORT where a VM waits in migrate-receive"
    )
    downtime_ms: float | None = Field(None, gt=0, le=60_000)
    max_rounds: int | None = Field(None, ge=1, le=1000)
    auth_key_file: HostPath | None = Field(None, description="the shared migration key")


class MigrateReceiveParams(Body):
    listen: Annotated[str, StringConstraints(min_length=3, max_length=300)] = Field(
        description="HOST:PORT to listen on (port 0: any free port)"
    )
    auth_key_file: HostPath | None = Field(
        None, description="the shared migration key; required unless HOST is a loopback address"
    )
    resume_vm: bool = Field(True, description="run the VM when it has arrived (else paused)")


class Scheduler(Body):
    weight: int = Field(
        ge=1,
        le=10000,
        description="CPU weight of the VM's VMM process against the other VMs (default 100, "
        "as cgroup v2's cpu.weight)",
    )


class StopInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    stop_reason: str
    exit_code: int | None = None
    message: str = ""


class VmStats(BaseModel):
    """GET /vm/stats (kvmpy extension): the VM's state and exit statistics."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: State
    pid: int | None = None
    uptime_s: float = 0.0
    output_bytes: int = 0
    console_bytes: int = Field(0, description="output bytes the daemon has received")
    exits: dict[str, Any] | None = None
    vcpu_time_s: list[float] = Field(default_factory=list)
    weight: int = 100
    snapshots: list[str] = Field(default_factory=list)
    stop: StopInfo | None = None
    crash: str | None = None
    listening: str | None = None


class Sample(BaseModel):
    t: float = Field(description="seconds since the daemon started")
    state: State
    exits: int
    exits_per_s: float
    vcpu_time_s: float
    vcpu_util: float = Field(description="vCPU seconds per second, all vCPUs together")
    output_bytes: int


class History(BaseModel):
    id: str
    samples: list[Sample]


class ConsoleTail(BaseModel):
    id: str
    output_bytes: int = Field(description="bytes the guest has output in all")
    data: str = Field(description="the last bytes, decoded as UTF-8 with replacements")


class VmSummary(BaseModel):
    id: str
    state: State
    base: str = Field(description="the prefix of this VM's paths ('' on a single-VM daemon)")
    uptime_s: float = 0.0
    output_bytes: int = 0
    exits: int = 0
    pid: int | None = None


class VmList(BaseModel):
    multi: bool
    vms: list[VmSummary]


class MigrateResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    destination: str
    downtime_ms: float
    total_s: float
    rounds: int


class Listening(BaseModel):
    address: str = Field(description="HOST:PORT the VM waits on")

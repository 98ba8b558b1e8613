"""A typed Python client of `kvmpy serve` (docs/api.md).

    from kvmpy.client import Client
    from kvmpy.api.models import MachineConfiguration, BootSource

    with Client("/tmp/kvmpy.sock") as c:                  # or Client(url=..., token=...)
        vm = c.vm("web1")                                 # multi mode: /vms/web1/...
        c.create_vm("web1")
        vm.put_machine_config(MachineConfiguration(vcpu_count=1, mem_size_mib=32, irqchip=True))
        vm.put_boot_source(BootSource(kernel_image_path="ticker.elf"))
        vm.start()
        vm.pause(); vm.create_snapshot("snap", "snap/memory"); vm.resume()
        print(vm.stats().exits)

Every method is one operation of the server's OpenAPI document: `OPERATIONS` maps the
method to (HTTP method, path, operationId), and tests/test_api_client.py checks the table and
the request bodies against `/openapi.json` (every operation covered, every body valid). The
bodies and answers are the server's own pydantic models (kvmpy.api.models). Errors are
`ApiClientError`, with the server's one-line `fault_message`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from .api import models as M
from .errors import KvmpyError

T = TypeVar("T", bound=BaseModel)

#: method name -> (HTTP method, path below the VM's prefix or absolute, operationId).
#: Paths starting with "/vms" or "/" + one of ROOT_PATHS are daemon-wide.
OPERATIONS: dict[str, tuple[str, str, str]] = {
    # daemon-wide
    "describe_instance": ("GET", "/", "describeInstance"),
    "version": ("GET", "/version", "getFirecrackerVersion"),
    "list_vms": ("GET", "/vms", "listVms"),
    "create_vm": ("PUT", "/vms/{vm_id}", "createVm"),
    "delete_vm": ("DELETE", "/vms/{vm_id}", "deleteVm"),
    # per VM
    "action": ("PUT", "/actions", "createSyncAction"),
    "get_machine_config": ("GET", "/machine-config", "getMachineConfiguration"),
    "put_machine_config": ("PUT", "/machine-config", "putMachineConfiguration"),
    "patch_machine_config": ("PATCH", "/machine-config", "patchMachineConfiguration"),
    "put_boot_source": ("PUT", "/boot-source", "putGuestBootSource"),
    "put_drive": ("PUT", "/drives/{drive_id}", "putGuestDriveByID"),
    "patch_drive": ("PATCH", "/drives/{drive_id}", "patchGuestDriveByID"),
    "put_network_interface": ("PUT", "/network-interfaces/{iface_id}",
                              "putGuestNetworkInterfaceByID"),
    "patch_network_interface": ("PATCH", "/network-interfaces/{iface_id}",
                                "patchGuestNetworkInterfaceByID"),
    "put_vsock": ("PUT", "/vsock", "putGuestVsock"),
    "put_entropy": ("PUT", "/entropy", "putEntropyDevice"),
    "put_balloon": ("PUT", "/balloon", "putBalloon"),
    "patch_balloon": ("PATCH", "/balloon", "patchBalloon"),
    "get_balloon": ("GET", "/balloon", "describeBalloonConfig"),
    "get_balloon_stats": ("GET", "/balloon/statistics", "describeBalloonStats"),
    "patch_balloon_stats": ("PATCH", "/balloon/statistics", "patchBalloonStatsInterval"),
    "put_logger": ("PUT", "/logger", "putLogger"),
    "put_metrics": ("PUT", "/metrics", "putMetrics"),
    "patch_vm": ("PATCH", "/vm", "patchVm"),
    "get_vm_config": ("GET", "/vm/config", "getExportVmConfig"),
    "create_snapshot": ("PUT", "/snapshot/create", "createSnapshot"),
    "load_snapshot": ("PUT", "/snapshot/load", "loadSnapshot"),
    "stats": ("GET", "/vm/stats", "describeVmStats"),
    "history": ("GET", "/vm/history", "describeVmHistory"),
    "console_tail": ("GET", "/console/tail", "describeConsoleTail"),
    "migrate": ("PUT", "/migrate", "migrateVm"),
    "migrate_receive": ("PUT", "/migrate-receive", "migrateReceive"),
    "get_scheduler": ("GET", "/scheduler", "describeScheduler"),
    "put_scheduler": ("PUT", "/scheduler", "putScheduler"),
}  # fmt: skip
DAEMON_OPS = {"describe_instance", "version", "list_vms", "create_vm", "delete_vm"}


class ApiClientError(KvmpyError):
    """The server refused a request (its fault_message), or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    """A connection to one `kvmpy serve`: its Unix socket (`socket`), or its TCP listener
    (`url` and `token`)."""

    def __init__(
        self,
        socket: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ):
        if (socket is None) == (url is None):
            raise ApiClientError("give the API's Unix socket or its URL, not both")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if socket is not None:
            transport = httpx.HTTPTransport(uds=socket)
            base = "http://localhost"
        else:
            transport = httpx.HTTPTransport()
            base = url.rstrip("/")  # type: ignore[union-attr]
        self.socket, self.url, self.token = socket, url, token
        self._http = httpx.Client(transport=transport, base_url=base, headers=headers,
                                  timeout=timeout)  # fmt: skip
        self._multi: bool | None = None
        #: Each request's latency in seconds, when a list is set here (the load benchmark).
        self.latencies: list[tuple[str, float]] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def request(self, op: str, prefix: str = "", body: BaseModel | dict | None = None,
                params: dict[str, Any] | None = None, **path: str) -> Any:  # fmt: skip
        method, template, _ = OPERATIONS[op]
        url = (template if op in DAEMON_OPS else prefix + template).format(**path) or "/"
        if isinstance(body, BaseModel):
            body = body.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            t0 = time.perf_counter()
            r = self._http.request(method, url, json=body, params=params,
                                   headers={"Accept": "application/json"})  # fmt: skip
            if self.latencies is not None:
                self.latencies.append((op, time.perf_counter() - t0))
        except httpx.HTTPError as e:
            where = self.socket or self.url
            raise ApiClientError(f"cannot reach the kvmpy API at {where}: {e}") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("fault_message") or r.text
            except ValueError:
                msg = r.text or r.reason_phrase
            raise ApiClientError(msg, r.status_code)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def _typed(self, model: type[T], doc: Any) -> T:
        return model.model_validate(doc)

    @property
    def multi(self) -> bool:
        if self._multi is None:
            self._multi = self.list_vms().multi
        return self._multi

    # --- the daemon ------------------------------------------------------------------------

    def describe_instance(self) -> M.InstanceInfo:
        return self._typed(M.InstanceInfo, self.request("describe_instance"))

    def version(self) -> M.FirecrackerVersion:
        return self._typed(M.FirecrackerVersion, self.request("version"))

    def list_vms(self) -> M.VmList:
        return self._typed(M.VmList, self.request("list_vms"))

    def create_vm(self, vm_id: str, config: M.FullVmConfiguration | None = None) -> VmClient:
        self.request("create_vm", body=config, vm_id=vm_id)
        return self.vm(vm_id)

    def delete_vm(self, vm_id: str) -> None:
        self.request("delete_vm", vm_id=vm_id)

    def openapi(self) -> dict[str, Any]:
        r = self._http.get("/openapi.json")
        r.raise_for_status()
        return r.json()

    def vm(self, vm_id: str | None = None) -> VmClient:
        """The VM `vm_id` (multi mode), or the daemon's one VM (single mode: any id)."""
        if self.multi:
            if vm_id is None:
                raise ApiClientError("this daemon serves many VMs: name one")
            return VmClient(self, vm_id, f"/vms/{vm_id}")
        return VmClient(self, vm_id or self.describe_instance().id, "")


class VmClient:
    """One VM's operations (Firecracker's paths under the VM's prefix)."""

    def __init__(self, client: Client, vm_id: str, prefix: str):
        self.client, self.id, self.prefix = client, vm_id, prefix

    def _r(self, op: str, body: Any = None, params: dict | None = None, **path: str) -> Any:
        return self.client.request(op, self.prefix, body, params, **path)

    # Firecracker's operations
    def action(self, action_type: str) -> None:
        self._r("action", M.InstanceActionInfo(action_type=action_type))  # type: ignore[arg-type]

    def start(self) -> None:
        self.action("InstanceStart")

    def stop(self) -> None:
        self.action("Stop")

    def flush_metrics(self) -> None:
        self.action("FlushMetrics")

    def get_machine_config(self) -> M.MachineConfiguration:
        return M.MachineConfiguration.model_validate(self._r("get_machine_config"))

    def put_machine_config(self, config: M.MachineConfiguration) -> None:
        self._r("put_machine_config", config)

    def patch_machine_config(self, update: M.MachineConfigurationUpdate) -> None:
        self._r("patch_machine_config", update)

    def put_boot_source(self, boot: M.BootSource) -> None:
        self._r("put_boot_source", boot)

    def put_drive(self, drive: M.Drive) -> None:
        self._r("put_drive", drive, drive_id=drive.drive_id)

    def patch_drive(self, drive: M.PartialDrive) -> None:
        self._r("patch_drive", drive, drive_id=drive.drive_id)

    def put_network_interface(self, iface: M.NetworkInterface) -> None:
        self._r("put_network_interface", iface, iface_id=iface.iface_id)

    def patch_network_interface(self, iface: M.PartialNetworkInterface) -> None:
        self._r("patch_network_interface", iface, iface_id=iface.iface_id)

    def put_vsock(self, vsock: M.Vsock) -> None:
        self._r("put_vsock", vsock)

    def put_entropy(self, entropy: M.EntropyDevice | None = None) -> None:
        self._r("put_entropy", entropy or M.EntropyDevice())

    def put_balloon(self, balloon: M.Balloon) -> None:
        self._r("put_balloon", balloon)

    def patch_balloon(self, update: M.BalloonUpdate) -> None:
        self._r("patch_balloon", update)

    def get_balloon(self) -> M.Balloon:
        return M.Balloon.model_validate(self._r("get_balloon"))

    def get_balloon_stats(self) -> M.BalloonStats:
        return M.BalloonStats.model_validate(self._r("get_balloon_stats"))

    def patch_balloon_stats(self, update: M.BalloonStatsUpdate) -> None:
        self._r("patch_balloon_stats", update)

    def put_logger(self, logger: M.Logger) -> None:
        self._r("put_logger", logger)

    def put_metrics(self, metrics: M.Metrics) -> None:
        self._r("put_metrics", metrics)

    def patch_vm(self, state: str) -> None:
        self._r("patch_vm", M.Vm(state=state))  # type: ignore[arg-type]

    def pause(self) -> None:
        self.patch_vm("Paused")

    def resume(self) -> None:
        self.patch_vm("Resumed")

    def get_vm_config(self) -> M.FullVmConfiguration:
        return M.FullVmConfiguration.model_validate(self._r("get_vm_config"))

    def create_snapshot(self, snapshot_path: str, mem_file_path: str | None = None) -> None:
        """A snapshot directory; `mem_file_path` defaults to its memory file (no link)."""
        mem = mem_file_path or f"{snapshot_path.rstrip('/')}/memory"
        self._r("create_snapshot", M.SnapshotCreateParams(snapshot_path=snapshot_path,
                                                          mem_file_path=mem))  # fmt: skip

    def load_snapshot(self, snapshot_path: str, *, resume: bool = True, lazy: bool = False,
                      mem_file_path: str | None = None) -> None:  # fmt: skip
        mem = mem_file_path or f"{snapshot_path.rstrip('/')}/memory"
        self._r("load_snapshot", M.SnapshotLoadParams(
            snapshot_path=snapshot_path, resume_vm=resume, lazy=lazy or None,
            mem_backend=M.MemoryBackend(backend_type="File", backend_path=mem)))  # fmt: skip

    # kvmpy's extensions
    def stats(self) -> M.VmStats:
        return M.VmStats.model_validate(self._r("stats"))

    def history(self) -> M.History:
        return M.History.model_validate(self._r("history"))

    def console_tail(self, nbytes: int = 4096) -> M.ConsoleTail:
        return M.ConsoleTail.model_validate(self._r("console_tail", params={"bytes": nbytes}))

    def migrate(self, params: M.MigrateParams) -> M.MigrateResult:
        return M.MigrateResult.model_validate(self._r("migrate", params))

    def migrate_receive(self, params: M.MigrateReceiveParams) -> M.Listening:
        return M.Listening.model_validate(self._r("migrate_receive", params))

    def get_scheduler(self) -> M.Scheduler:
        return M.Scheduler.model_validate(self._r("get_scheduler"))

    def put_scheduler(self, weight: int) -> None:
        self._r("put_scheduler", M.Scheduler(weight=weight))

    # the console WebSocket
    def console(self) -> ConsoleSession:
        """Attach to the console: iterate over output chunks, `send()` input."""
        return ConsoleSession(self.client, self.prefix + "/console/attach")


class ConsoleSession:
    """The console WebSocket (`GET .../console/attach`): the last 4 KiB of output, then
    output as it comes; `send(data)` types into the virtio console."""

    def __init__(self, client: Client, path: str):
        from websockets.sync.client import connect, unix_connect

        try:
            if client.socket is not None:
                ws = unix_connect(client.socket, f"ws://localhost{path}")
            else:
                url = client.url.replace("http", "ws", 1).rstrip("/") + path  # type: ignore[union-attr]
                headers = {"Authorization": f"Bearer {client.token}"} if client.token else None
                ws = connect(url, additional_headers=headers)
        except (OSError, Exception) as e:
            raise ApiClientError(f"cannot attach to the console: {e}") from None
        self._ws = ws.__enter__()  # websockets wants its connections entered
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[bytes]:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                msg = self._ws.recv()
            except ConnectionClosed:
                return
            yield msg if isinstance(msg, bytes) else msg.encode()

    def send(self, data: bytes) -> None:
        with self._lock:
            self._ws.send(data)

    def close(self) -> None:
        self._ws.__exit__(None, None, None)

    def __enter__(self) -> ConsoleSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copy_console(session: ConsoleSession, write: Callable[[bytes], None]) -> None:
    """Write every output chunk of `session` with `write` until it closes."""
    for chunk in session:
        write(chunk)

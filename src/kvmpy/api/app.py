"""The HTTP API of `kvmpy serve`: Firecracker's paths and bodies, kvmpy's extensions, the
OpenAPI document and the dashboard, as one FastAPI application.

Single-VM mode serves Firecracker's paths at the root for one VM, as Firecracker does;
`--multi` serves them under `/vms/{vm_id}` for any number of VMs. The routes are made once,
by `vm_routes`, and mounted at either prefix, so both modes answer the same bodies.

Errors are Firecracker's: status 400 (404 for an unknown VM id in multi mode, 401 without the
token on the TCP listener) and `{"fault_message": "one line"}`; request validation errors are
400 too, never FastAPI's 422, and `/openapi.json` says so (generated from these routes and
the models in kvmpy.api.models, with the 422 answers FastAPI would list replaced).
"""

import asyncio
import contextlib
import hmac
import logging
import time
from importlib import resources as pkg_resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import models as M
from .errors import ApiError, one_line
from .supervisor import Daemon, Vm

log = logging.getLogger("kvmpy.api")

#: The Firecracker API level whose paths and bodies kvmpy follows (its swagger's version).
FIRECRACKER_API = "1.17.0"
NO_CONTENT = 204


def kvmpy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvmpy")
    except PackageNotFoundError:
        return "unknown"


def _fault(status: int, message: str) -> JSONResponse:
    return JSONResponse({"fault_message": one_line(message)}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    kind = e.get("type", "")
    if kind == "json_invalid":
        text = "the request body is not valid JSON"
    elif kind == "missing" and not loc:
        text = "the request needs a JSON body"
    elif kind == "extra_forbidden":
        text = f"unknown field {where!r}"
    else:
        text = f"{where}: {e.get('msg')}" if where else str(e.get("msg"))
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def vm_routes(vm_dep: Any, responses: dict) -> APIRouter:
    """Every per-VM route, Firecracker's and kvmpy's; `vm_dep` finds the VM."""
    r = APIRouter(responses=responses)
    VmD = Annotated[Vm, Depends(vm_dep)]
    nc: dict[str, Any] = {"status_code": NO_CONTENT, "response_class": Response}

    def pre_boot(vm: Vm, what: str) -> None:
        if vm.state != "Not started" or vm.listening or (vm.worker and vm.worker.alive):
            raise ApiError(f"{what}: the VM has been started; this is a pre-boot setting")

    @r.put("/actions", operation_id="createSyncAction", **nc)
    async def actions(body: M.InstanceActionInfo, vm: VmD) -> Response:
        a = body.action_type
        if a == "InstanceStart":
            await vm.start()
        elif a == "FlushMetrics":
            await vm.flush_metrics()
        elif a == "Stop":
            await vm.stop()
        else:
            await vm.ctrl_alt_del()
        return Response(status_code=NO_CONTENT)

    @r.get("/machine-config", operation_id="getMachineConfiguration",
           response_model=M.MachineConfiguration, response_model_exclude_none=True)  # fmt: skip
    async def get_machine_config(vm: VmD):
        return vm.resources.machine

    @r.put("/machine-config", operation_id="putMachineConfiguration", **nc)
    async def put_machine_config(body: M.MachineConfiguration, vm: VmD):
        pre_boot(vm, "machine-config")
        vm.resources.set_machine(body)
        return Response(status_code=NO_CONTENT)

    @r.patch("/machine-config", operation_id="patchMachineConfiguration", **nc)
    async def patch_machine_config(body: M.MachineConfigurationUpdate, vm: VmD):
        pre_boot(vm, "machine-config")
        vm.resources.patch_machine(body)
        return Response(status_code=NO_CONTENT)

    @r.put("/boot-source", operation_id="putGuestBootSource", **nc)
    async def put_boot_source(body: M.BootSource, vm: VmD):
        pre_boot(vm, "boot-source")
        await asyncio.to_thread(vm.resources.set_boot, body)
        return Response(status_code=NO_CONTENT)

    DriveId = Annotated[str, FPath(pattern=M.ID_PATTERN)]

    @r.put("/drives/{drive_id}", operation_id="putGuestDriveByID", **nc)
    async def put_drive(drive_id: DriveId, body: M.Drive, vm: VmD):
        pre_boot(vm, "drives")
        vm.resources.put_drive(drive_id, body)
        return Response(status_code=NO_CONTENT)

    @r.patch("/drives/{drive_id}", operation_id="patchGuestDriveByID", **nc)
    async def patch_drive(drive_id: DriveId, body: M.PartialDrive, vm: VmD):
        if drive_id not in vm.resources.drives:
            raise ApiError(f"no drive {drive_id!r}")
        raise ApiError(
            "PATCH /drives: kvmpy cannot swap a drive's backing file or rate limiter on a "
            "running VM; PUT the drive before InstanceStart"
        )

    @r.put("/network-interfaces/{iface_id}", operation_id="putGuestNetworkInterfaceByID", **nc)
    async def put_net(iface_id: DriveId, body: M.NetworkInterface, vm: VmD):
        pre_boot(vm, "network-interfaces")
        vm.resources.put_net(iface_id, body)
        return Response(status_code=NO_CONTENT)

    @r.patch("/network-interfaces/{iface_id}", operation_id="patchGuestNetworkInterfaceByID",
             **nc)  # fmt: skip
    async def patch_net(iface_id: DriveId, body: M.PartialNetworkInterface, vm: VmD):
        raise ApiError("PATCH /network-interfaces: kvmpy's virtio-net has no rate limiters")

    @r.put("/vsock", operation_id="putGuestVsock", **nc)
    async def put_vsock(body: M.Vsock, vm: VmD):
        pre_boot(vm, "vsock")
        vm.resources.put_vsock(body)
        return Response(status_code=NO_CONTENT)

    @r.put("/entropy", operation_id="putEntropyDevice", **nc)
    async def put_entropy(body: M.EntropyDevice, vm: VmD):
        pre_boot(vm, "entropy")
        vm.resources.put_entropy(body)
        return Response(status_code=NO_CONTENT)

    @r.put("/balloon", operation_id="putBalloon", **nc)
    async def put_balloon(body: M.Balloon, vm: VmD):
        pre_boot(vm, "balloon")
        vm.resources.put_balloon(body)
        return Response(status_code=NO_CONTENT)

    @r.patch("/balloon", operation_id="patchBalloon", **nc)
    async def patch_balloon(body: M.BalloonUpdate, vm: VmD):
        await vm.balloon_target(body.amount_mib)
        return Response(status_code=NO_CONTENT)

    @r.get("/balloon", operation_id="describeBalloonConfig", response_model=M.Balloon,
           response_model_exclude_none=True)  # fmt: skip
    async def get_balloon(vm: VmD):
        if vm.resources.balloon is None:
            raise ApiError("no balloon device is configured")
        return vm.resources.balloon

    @r.get("/balloon/statistics", operation_id="describeBalloonStats",
           response_model=M.BalloonStats)  # fmt: skip
    async def get_balloon_stats(vm: VmD):
        return await vm.balloon_stats()

    @r.patch("/balloon/statistics", operation_id="patchBalloonStatsInterval", **nc)
    async def patch_balloon_stats(body: M.BalloonStatsUpdate, vm: VmD):
        pre_boot(vm, "balloon/statistics (kvmpy sets the interval before boot)")
        b = vm.resources.balloon
        if b is None:
            raise ApiError("no balloon device is configured")
        vm.resources.balloon = b.model_copy(
            update={"stats_polling_interval_s": body.stats_polling_interval_s}
        )
        return Response(status_code=NO_CONTENT)

    @r.put("/logger", operation_id="putLogger", **nc)
    async def put_logger(body: M.Logger, vm: VmD):
        pre_boot(vm, "logger")
        vm.resources.put_logger(body)
        return Response(status_code=NO_CONTENT)

    @r.put("/metrics", operation_id="putMetrics", **nc)
    async def put_metrics(body: M.Metrics, vm: VmD):
        vm.resources.put_metrics(body)
        return Response(status_code=NO_CONTENT)

    @r.patch("/vm", operation_id="patchVm", **nc)
    async def patch_vm(body: M.Vm, vm: VmD):
        if body.state == "Paused":
            await vm.pause()
        else:
            await vm.resume()
        return Response(status_code=NO_CONTENT)

    @r.get("/vm/config", operation_id="getExportVmConfig",
           response_model=M.FullVmConfiguration, response_model_exclude_none=True,
           response_model_by_alias=True)  # fmt: skip
    async def get_vm_config(vm: VmD):
        return JSONResponse(vm.resources.full())

    @r.put("/snapshot/create", operation_id="createSnapshot", **nc)
    async def snapshot_create(body: M.SnapshotCreateParams, vm: VmD):
        await vm.snapshot(body)
        return Response(status_code=NO_CONTENT)

    @r.put("/snapshot/load", operation_id="loadSnapshot", **nc)
    async def snapshot_load(body: M.SnapshotLoadParams, vm: VmD):
        await vm.load_snapshot(body)
        return Response(status_code=NO_CONTENT)

    # --- kvmpy extensions ----------------------------------------------------------------

    @r.get("/vm/stats", operation_id="describeVmStats", response_model=M.VmStats,
           summary="kvmpy extension: state, exit statistics, vCPU time")  # fmt: skip
    async def vm_stats(vm: VmD):
        return await vm.stats()

    @r.get("/vm/history", operation_id="describeVmHistory", response_model=M.History,
           summary="kvmpy extension: exits/s and vCPU time samples (1 s apart)")  # fmt: skip
    async def vm_history(vm: VmD):
        vm.observed = time.monotonic()
        return {"id": vm.id, "samples": list(vm.samples)}

    @r.get("/console/tail", operation_id="describeConsoleTail", response_model=M.ConsoleTail,
           summary="kvmpy extension: the last bytes of the guest's console output")  # fmt: skip
    async def console_tail(vm: VmD, bytes: Annotated[int, Query(ge=0, le=256 * 1024)] = 4096):
        data = vm.console.tail(bytes)
        return {"id": vm.id, "output_bytes": vm.console.total,
                "data": data.decode("utf-8", errors="replace")}  # fmt: skip

    @r.put("/migrate", operation_id="migrateVm", response_model=M.MigrateResult,
           summary="kvmpy extension: live-migrate the VM to a migrate-receive elsewhere")  # fmt: skip
    async def migrate(body: M.MigrateParams, vm: VmD):
        return await vm.migrate(body)

    @r.put("/migrate-receive", operation_id="migrateReceive", response_model=M.Listening,
           summary="kvmpy extension: wait for a live migration into this (fresh) VM")  # fmt: skip
    async def migrate_receive(body: M.MigrateReceiveParams, vm: VmD):
        return {"address": await vm.migrate_receive(body)}

    @r.get("/scheduler", operation_id="describeScheduler", response_model=M.Scheduler,
           summary="kvmpy extension: the VM's CPU weight")  # fmt: skip
    async def get_scheduler(vm: VmD):
        return {"weight": vm.weight}

    @r.put("/scheduler", operation_id="putScheduler", **nc,
           summary="kvmpy extension: the VM's CPU weight against the other VMs")  # fmt: skip
    async def put_scheduler(body: M.Scheduler, vm: VmD):
        await vm.set_weight(body.weight)
        return Response(status_code=NO_CONTENT)

    return r


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(
        title="kvmpy management API",
        version=kvmpy_version(),
        description="Firecracker's API (paths and bodies of API "
        f"{FIRECRACKER_API}) for kvmpy VMs, with kvmpy's extensions; docs/api.md lists the "
        "differences."
        + (
            " Many VMs: every per-VM path is under /vms/{vm_id}."
            if daemon.multi
            else " One VM, at the root, as Firecracker."
        ),  # fmt: skip
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.daemon = daemon
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": M.Error, "description": "bad input, or not possible in this state"},
        401: {"model": M.Error, "description": "TCP listener: no or wrong bearer token"},
    }
    if daemon.multi:
        errors[404] = {"model": M.Error, "description": "no VM with this id"}

        def vm_dep(vm_id: Annotated[str, FPath(pattern=M.ID_PATTERN)]) -> Vm:
            return daemon.get(vm_id)

        app.include_router(vm_routes(vm_dep, errors), prefix="/vms/{vm_id}")
    else:

        def vm_dep() -> Vm:
            return daemon.vms[daemon.instance_id]

        app.include_router(vm_routes(vm_dep, errors))

    @app.get("/", operation_id="describeInstance", response_model=M.InstanceInfo,
             responses={**errors, 200: {"content": {"text/html": {}}, "description":
                        "the instance (JSON), or the dashboard for a browser (Accept: "
                        "text/html)"}})  # fmt: skip
    async def describe_instance(request: Request):
        if _wants_html(request):
            return HTMLResponse(dashboard_html())
        state = "Running" if daemon.multi else daemon.vms[daemon.instance_id].state
        return {"app_name": "kvmpy", "id": daemon.instance_id, "state": state,
                "vmm_version": kvmpy_version()}  # fmt: skip

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(dashboard_html())

    @app.get("/version", operation_id="getFirecrackerVersion",
             response_model=M.FirecrackerVersion, responses=errors)  # fmt: skip
    async def version():
        return {"firecracker_version": FIRECRACKER_API, "kvmpy_version": kvmpy_version()}

    @app.get("/vms", operation_id="listVms", response_model=M.VmList, responses=errors,
             summary="kvmpy extension: every VM of this daemon")  # fmt: skip
    async def list_vms():
        for vm in daemon.vms.values():
            vm.observed = time.monotonic()
        return {"multi": daemon.multi,
                "vms": [vm.summary(daemon.base(vm)) for vm in daemon.vms.values()]}  # fmt: skip

    if daemon.multi:
        IdP = Annotated[str, FPath(pattern=M.ID_PATTERN)]

        @app.put("/vms/{vm_id}", operation_id="createVm", status_code=NO_CONTENT,
                 response_class=Response, responses=errors,
                 summary="kvmpy extension: a new VM, empty or configured from a "
                 "Firecracker config-file body")  # fmt: skip
        async def create_vm(vm_id: IdP, body: M.FullVmConfiguration | None = None):
            resources = None
            if body is not None:
                from .config_file import resources_from

                resources = await asyncio.to_thread(resources_from, body, daemon.paths)
            vm = daemon.create(vm_id)
            if resources is not None:
                vm.resources = resources
            return Response(status_code=NO_CONTENT)

        @app.delete("/vms/{vm_id}", operation_id="deleteVm", status_code=NO_CONTENT,
                    response_class=Response, responses=errors,
                    summary="kvmpy extension: stop the VM (if running) and forget it")  # fmt: skip
        async def delete_vm(vm_id: IdP):
            await daemon.delete(vm_id)
            return Response(status_code=NO_CONTENT)

    console_path = "/vms/{vm_id}/console/attach" if daemon.multi else "/console/attach"

    @app.websocket(console_path)
    async def console_attach(ws: WebSocket):
        vm_id = ws.path_params.get("vm_id", daemon.instance_id)
        vm = daemon.vms.get(vm_id)
        if vm is None:
            await ws.close(code=4404, reason=f"no VM {vm_id!r}")
            return
        await attach_console(ws, vm)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _fault(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _fault(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):  # Firecracker's answer for both
            return _fault(400, f"Invalid request method and/or path: {request.method} "
                          f"{request.url.path}")  # fmt: skip
        return _fault(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _fault(500, f"internal error: {exc!r}")

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        key = f"{request.method} {getattr(route, 'path', '?')}"
        daemon.requests[key] = daemon.requests.get(key, 0) + 1
        return response

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version,
                              description=app.description, routes=app.routes)  # fmt: skip
            for item in doc.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            doc.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the TCP listener only (kvmpy serve --http "
                           "--token-file); the Unix socket needs none"}}  # fmt: skip
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(JsonBodies)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json():
        return JSONResponse(openapi())

    return app


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if "text/html" not in accept:
        return False
    return accept.find("text/html") < max(accept.find("application/json"), 0) or (
        "application/json" not in accept
    )


_DASHBOARD: str | None = None


def dashboard_html() -> str:
    global _DASHBOARD
    if _DASHBOARD is None:
        _DASHBOARD = pkg_resources.files("kvmpy.api").joinpath("dashboard.html").read_text()
    return _DASHBOARD


async def attach_console(ws: WebSocket, vm: Vm) -> None:
    """The console over a WebSocket: what the guest printed last (up to 4 KiB), then its
    output as it comes (binary frames); what the client sends is typed into the console (a
    Linux guest's, or an SDK guest's virtio console)."""
    await ws.accept()
    q = vm.console.subscribe()
    tail = vm.console.tail(4096)
    warned = False

    async def pump_out() -> None:
        if tail:
            await ws.send_bytes(tail)
        while (chunk := await q.get()) is not None:
            await ws.send_bytes(chunk)
        await ws.close(code=1000, reason=f"the VM is {vm.state.lower()}")

    out = asyncio.create_task(pump_out())
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            if not data:
                continue
            if (not vm.takes_input() or not vm.send_input(data)) and not warned:
                warned = True
                await ws.send_text(
                    "kvmpy: this VM takes no console input (an SDK guest needs machine-config "
                    "console: virtio) or is not running: input is not delivered\n"
                )
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        vm.console.subscribers.discard(q)
        out.cancel()
        with contextlib.suppress(BaseException):
            await out


class JsonBodies:
    """Firecracker reads every body as JSON whatever its Content-Type says (curl -d sends
    application/x-www-form-urlencoded); so does kvmpy."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") in ("PUT", "PATCH", "POST"):
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware of the TCP listener: every request carries the token, in
    `Authorization: Bearer TOKEN` or (RFC 6750 2.3, for a browser's first page load and its
    WebSockets) an `access_token` query parameter."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _ok(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                return hmac.compare_digest(v[7:].strip(), self.token)
        from urllib.parse import parse_qs

        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return any(hmac.compare_digest(t.encode(), self.token) for t in qs.get("access_token", []))

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self._ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401,
                            "reason": "a bearer token is required"})  # fmt: skip
                return
            resp = _fault(401, "this listener needs the bearer token (Authorization: Bearer "
                          "TOKEN, or ?access_token=TOKEN)")  # fmt: skip
            resp.headers["WWW-Authenticate"] = 'Bearer realm="kvmpy"'
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)

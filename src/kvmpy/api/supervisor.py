"""The daemon's side of its VMs: one `Vm` record per VM, each running in its own VMM process
(kvmpy.api.worker), started, watched and stopped from the daemon's event loop.

A `Vm` outlives its process: its configuration, console output (the last 256 KiB), snapshots,
last statistics and how it ended stay in the record, whatever happened to the process. An
operation that fails leaves the record as it was, and a VMM process that dies without a result
(killed, a crash of the interpreter) makes the VM `Crashed` with what it said last on stderr.
Operations that change a VM run one at a time per VM; a second one meanwhile is refused at
once, naming the first, rather than queued behind a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import models as M
from .errors import ApiError, one_line
from .resources import DEFAULT_WEIGHT, PathPolicy, Resources, from_vm_config

log = logging.getLogger("kvmpy.api")

#: How long a VMM process may take to build its machine (a large eager restore reads all of
#: its memory first).
START_TIMEOUT_S = 120.0
CONSOLE_KEEP = 256 * 1024
#: Statistics samples are taken while someone looked at them within this many seconds.
OBSERVE_S = 30.0


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


class ConsoleBuffer:
    """The guest's output as the daemon received it: a count of every byte, the last
    CONSOLE_KEEP bytes, and the live subscribers (console WebSockets)."""

    def __init__(self, keep: int = CONSOLE_KEEP):
        self.keep = keep
        self.data = bytearray()
        self.total = 0
        self.subscribers: set[asyncio.Queue] = set()

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * self.keep:
            del self.data[: len(self.data) - self.keep]
        for q in list(self.subscribers):
            try:
                q.put_nowait(chunk)
            except asyncio.QueueFull:  # a reader that does not keep up is cut off
                self.subscribers.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    def tail(self, n: int) -> bytes:
        return bytes(self.data[-n:]) if n > 0 else b""

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self.subscribers.add(q)
        return q

    def close(self) -> None:
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        self.subscribers.clear()


async def control_request(
    path: str,
    op: str,
    args: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """One request on a VMM's control socket (kvmpy.persist.control's line protocol)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    except (OSError, TimeoutError) as e:
        raise ApiError(f"{op}: the VMM does not answer on its control socket ({e})") from None
    try:
        writer.write(json.dumps({"op": op, **(args or {})}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise ApiError(f"{op}: the VMM closed the control connection without answering")
            doc = json.loads(line)
            if "progress" in doc:
                if progress is not None:
                    progress(doc["progress"])
                continue
            if doc.get("ok"):
                return doc.get("result") or {}
            raise ApiError(f"{op}: {doc.get('error') or 'failed'}")
    except TimeoutError:
        raise ApiError(f"{op}: no answer from the VMM within {timeout:g} s") from None
    except (OSError, ValueError) as e:
        raise ApiError(f"{op}: the control connection failed: {e}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class ControlChannel:
    """A kept-open control connection for frequent small requests (stats)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = asyncio.Lock()
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, op: str, timeout: float = 5.0) -> dict[str, Any]:
        async with self._lock:
            for attempt in (0, 1):
                try:
                    if self._rw is None:
                        self._rw = await asyncio.wait_for(
                            asyncio.open_unix_connection(self.path), timeout
                        )
                    reader, writer = self._rw
                    writer.write(json.dumps({"op": op}).encode() + b"\n")
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), timeout)
                    if not line:
                        raise ConnectionError("closed")
                    doc = json.loads(line)
                except (OSError, ValueError, ConnectionError, TimeoutError) as e:
                    self.close()
                    if attempt:
                        raise ApiError(f"{op}: the VMM does not answer ({e!r})") from None
                    continue
                if doc.get("ok"):
                    return doc.get("result") or {}
                raise ApiError(f"{op}: {doc.get('error') or 'failed'}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


class CpuWeights:
    """Scheduler weights for VMM processes: a cgroup per VM with cpu.weight (v2) or
    cpu.shares (v1) where the daemon may create cgroups, else the nice value of every thread
    (CFS weights grow 1.25x per nice step)."""

    def __init__(self, tag: str):
        self.base: Path | None = None
        self.v2 = False
        candidates = [(Path("/sys/fs/cgroup"), True), (Path("/sys/fs/cgroup/unified"), True),
                      (Path("/sys/fs/cgroup/cpu"), False)]  # fmt: skip
        for root, v2 in candidates:
            ok = (
                (root / "cgroup.controllers").exists()
                and "cpu" in (root / "cgroup.controllers").read_text().split()
                if v2
                else (root / "cpu.shares").exists()
            )
            if not ok:
                continue
            d = root / tag
            try:
                d.mkdir(exist_ok=True)
                if v2:
                    (d / "cgroup.subtree_control").write_text("+cpu")
            except OSError:
                with contextlib.suppress(OSError):
                    d.rmdir()
                continue
            self.base, self.v2 = d, v2
            break
        self.kind = ("cgroup v2" if self.v2 else "cgroup v1") if self.base else "nice"

    def apply(self, vm_id: str, pid: int, weight: int) -> None:
        if self.base is not None:
            d = self.base / vm_id
            try:
                d.mkdir(exist_ok=True)
                if self.v2:
                    (d / "cpu.weight").write_text(str(weight))
                else:
                    (d / "cpu.shares").write_text(str(max(2, weight * 1024 // 100)))
                (d / "cgroup.procs").write_text(str(pid))
                return
            except OSError as e:
                log.warning("cgroup %s: %s; using nice values", d, e)
        nice = max(-20, min(19, round(-math.log(weight / 100) / math.log(1.25))))
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError as e:
            raise ApiError(f"cannot set the VMM's scheduling weight: {e.strerror}") from None

    def release(self, vm_id: str) -> None:
        if self.base is not None:
            with contextlib.suppress(OSError):
                (self.base / vm_id).rmdir()

    def close(self) -> None:
        if self.base is not None:
            for d in self.base.iterdir() if self.base.exists() else ():
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                self.base.rmdir()


class Worker:
    """One VMM process and the tasks that read it."""

    def __init__(self, vm: Vm, proc: asyncio.subprocess.Process, control: str, spec_path: Path):
        self.vm = vm
        self.proc = proc
        self.pid = proc.pid
        self.control = control
        self.spec_path = spec_path
        self.channel = ControlChannel(control)
        self.events: asyncio.Queue = asyncio.Queue()
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.ready = False
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()


class Vm:
    def __init__(self, daemon: Daemon, vm_id: str):
        self.daemon = daemon
        self.id = vm_id
        self.resources = Resources(paths=daemon.paths)
        self._state = "Not started"
        #: Bumped by every change of state, so a stats answer that was on its way while an
        #: operation (resume, pause) changed the state cannot put the old state back.
        self.state_changes = 0
        self.worker: Worker | None = None
        self.busy: str | None = None
        self.console = ConsoleBuffer()
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.result: dict[str, Any] | None = None
        self.crash: str | None = None
        self.snapshots: list[str] = []
        self.weight = DEFAULT_WEIGHT
        self.samples: deque[dict[str, Any]] = deque(maxlen=600)
        self.observed = 0.0
        self.listening: str | None = None
        self.last_stats: dict[str, Any] = {}
        self.migration: dict[str, Any] | None = None

    # --- one operation at a time -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def operation(self, what: str):
        if self.busy is not None:
            raise ApiError(f"{what}: {self.busy} is under way on VM {self.id}; try again when "
                           "it is over")  # fmt: skip
        self.busy = what
        try:
            yield
        finally:
            self.busy = None

    def live(self, what: str) -> Worker:
        w = self.worker
        if w is None or not w.alive or not w.ready or self.state not in ("Running", "Paused"):
            raise ApiError(f"{what}: the VM is {self._state_words()}")
        return w

    def _state_words(self) -> str:
        if self.state == "Not started":
            return "not started (PUT /actions InstanceStart first)" if not self.listening else (
                f"waiting for a migration on {self.listening}")  # fmt: skip
        if self.state == "Crashed":
            return f"crashed: {self.crash}"
        if self.state == "Stopped" and self.result:
            return f"stopped ({self.result.get('stop_reason')}: {self.result.get('message')})"
        return self.state.lower()

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        async with self.operation("InstanceStart"):
            if self.state in ("Running", "Paused"):
                raise ApiError("InstanceStart: the VM is running already")
            if self.worker is not None and self.worker.alive:
                raise ApiError(f"InstanceStart: the VM is {self._state_words()}")
            config = await asyncio.to_thread(self.resources.vm_config, self.id)
            await self._spawn({"kind": "boot", "config": config.to_dict(), "paused": False})

    async def load_snapshot(self, p: M.SnapshotLoadParams) -> None:
        async with self.operation("snapshot/load"):
            if self.state != "Not started" or self.resources.configured or self.listening:
                raise ApiError(
                    "snapshot/load needs a fresh VM (nothing but the logger and metrics "
                    "configured, never started)"
                )
            if (p.mem_file_path is None) == (p.mem_backend is None):
                raise ApiError("snapshot/load takes exactly one of mem_file_path and mem_backend")
            if p.mem_backend is not None and p.mem_backend.backend_type == "Uffd":
                raise ApiError(
                    "mem_backend Uffd: kvmpy serves page faults with its own handler process, "
                    "not an external one: use backend_type File with lazy: true"
                )
            for name in ("enable_diff_snapshots", "track_dirty_pages", "clock_realtime"):
                if getattr(p, name):
                    raise ApiError(f"{name}: not supported by kvmpy (it must be false)")
            if p.network_overrides:
                raise ApiError("network_overrides: not supported by kvmpy")
            if p.vsock_override is not None:
                raise ApiError("vsock_override: not supported by kvmpy")
            paths = self.resources.paths
            snap = paths.resolve(p.snapshot_path, "snapshot_path")
            mem_given = p.mem_file_path or (p.mem_backend.backend_path if p.mem_backend else "")
            mem = paths.resolve(mem_given, "mem_file_path")
            if not os.path.isdir(snap):
                raise ApiError(f"snapshot_path {p.snapshot_path} is not a kvmpy snapshot "
                               "directory")  # fmt: skip
            inside = os.path.join(snap, "memory")
            try:
                same = os.path.samefile(mem, inside)
            except OSError as e:
                raise ApiError(f"the memory file {mem_given}: {e.strerror}") from None
            if not same:
                raise ApiError(
                    f"the memory file {mem_given} is not the memory of the snapshot "
                    f"{p.snapshot_path} (kvmpy keeps it in the snapshot directory; "
                    "snapshot/create links mem_file_path to it)"
                )
            await self._spawn({"kind": "restore", "snapshot": snap, "lazy": bool(p.lazy),
                               "paused": not p.resume_vm})  # fmt: skip

    async def migrate_receive(self, p: M.MigrateReceiveParams) -> str:
        async with self.operation("migrate-receive"):
            if self.state != "Not started" or self.resources.configured or self.listening:
                raise ApiError("migrate-receive needs a fresh VM (nothing configured, never "
                               "started, not listening already)")  # fmt: skip
            spec: dict[str, Any] = {"kind": "receive", "listen": p.listen,
                                    "paused": not p.resume_vm}  # fmt: skip
            if p.auth_key_file is not None:
                spec["auth_key_file"] = self.resources.paths.resolve(p.auth_key_file,
                                                                     "auth_key_file")  # fmt: skip
            await self._spawn(spec)
            assert self.listening is not None
            return self.listening

    async def _spawn(self, spec: dict[str, Any]) -> None:
        d = self.daemon
        rundir = d.rundir / self.id
        rundir.mkdir(mode=0o700, exist_ok=True)
        control = str(rundir / "control.sock")
        if len(os.fsencode(control)) >= 108:
            raise ApiError(f"the control socket path {control} is too long; use a shorter "
                           "--state-dir or VM id")  # fmt: skip
        parent, child = socket.socketpair()
        lg = self.resources.logger
        spec.update(control=control, status_fd=child.fileno(), name=self.id,
                    logger=lg.model_dump() if lg else None)  # fmt: skip
        spec_path = rundir / "spec.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.crash = None
        self.result = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kvmpy.api.worker", str(spec_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(child.fileno(),),
                start_new_session=True,  # the daemon's Ctrl-C is the daemon's to pass on
            )  # fmt: skip
        except OSError as e:
            parent.close()
            raise ApiError(f"cannot start a VMM process: {e.strerror}") from None
        finally:
            child.close()
        w = Worker(self, proc, control, spec_path)
        self.worker = w
        self.console.close()
        self.console = ConsoleBuffer()
        self.samples.clear()
        asyncio.create_task(self._read_console(w))
        asyncio.create_task(self._read_stderr(w))
        status_task = asyncio.create_task(self._read_status(w, parent))
        asyncio.create_task(self._watch(w, status_task))
        first = await self._next_event(w, START_TIMEOUT_S)
        if first["event"] == "listening":
            self.listening = first["address"]
            return
        if first["event"] == "ready":
            return
        # An error (or a process that died before it was ready): nothing changed.
        await w.exited.wait()
        raise ApiError(first.get("message") or "the VMM process failed to start")

    async def _next_event(self, w: Worker, timeout: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(w.events.get(), timeout)
        except TimeoutError:
            await self._kill(w)
            raise ApiError(f"the VMM process did not start within {timeout:g} s") from None

    async def _read_status(self, w: Worker, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while line := await reader.readline():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                ev = doc.get("event")
                if ev == "ready":
                    w.ready = True
                    w.started_at = time.monotonic()
                    self.listening = None
                    self.state = "Paused" if doc.get("paused") else "Running"
                    try:
                        from ..vmm.config import VmConfig

                        native = VmConfig.from_dict(doc.get("config"))
                        if not self.resources.configured or self.resources.boot is None:
                            old = self.resources
                            self.resources = from_vm_config(native, self.daemon.paths)
                            self.resources.logger, self.resources.metrics = old.logger, old.metrics
                            target = doc.get("balloon_target_bytes")
                            if self.resources.balloon is not None and isinstance(target, int):
                                # The target is the device's state, not its configuration.
                                self.resources.balloon = self.resources.balloon.model_copy(
                                    update={"amount_mib": target >> 20}
                                )
                    except Exception as e:  # the view only; the VM runs regardless
                        log.warning("VM %s: cannot describe its configuration: %s", self.id, e)
                    # Every VMM in a cgroup of its own (where cgroups can be had), so that
                    # weights compare VMs, not one VM against the daemon's whole group.
                    if self.weight != DEFAULT_WEIGHT or self.daemon.weights.base is not None:
                        with contextlib.suppress(ApiError):
                            self.daemon.weights.apply(self.id, w.pid, self.weight)
                    b = self.resources.balloon
                    if b is not None and b.amount_mib:
                        asyncio.create_task(self._initial_balloon(w, b.amount_mib))
                elif ev == "result":
                    w.result = doc.get("result") or {}
                elif ev == "error":
                    w.error = doc.get("message")
                elif ev == "migrated-in":
                    self.migration = doc.get("migration")
                if ev in ("ready", "error", "listening"):
                    w.events.put_nowait(doc)
        finally:
            writer.close()

    async def _initial_balloon(self, w: Worker, amount_mib: int) -> None:
        try:
            await control_request(w.control, "balloon", {"size": amount_mib << 20})
        except ApiError as e:
            log.warning("VM %s: the balloon's initial target: %s", self.id, e)

    async def _read_console(self, w: Worker) -> None:
        assert w.proc.stdout is not None
        while chunk := await w.proc.stdout.read(65536):
            self.console.feed(chunk)

    async def _read_stderr(self, w: Worker) -> None:
        assert w.proc.stderr is not None
        while line := await w.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            log.info("VM %s: %s", self.id, text)

    async def _watch(self, w: Worker, status_task: asyncio.Task) -> None:
        rc = await w.proc.wait()
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(status_task, 5.0)
        w.returncode = rc
        w.channel.close()
        if w.result is not None:
            self.result = w.result
            self.state = "Migrated" if w.result.get("stop_reason") == "migrated" else "Stopped"
            log.info("VM %s stopped: %s", self.id, w.result.get("stop_reason"))
        elif w.ready or self.listening:
            why = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit status {rc}"
            last = next((t for t in reversed(self.stderr_tail) if t.strip()), "")
            self.crash = f"the VMM process {w.pid} died ({why})" + (f": {last}" if last else "")
            self.state = "Crashed"
            self.listening = None
            log.warning("VM %s crashed: %s", self.id, self.crash)
        else:  # it never got ready: the start failed, and the VM is as it was
            w.events.put_nowait({"event": "error", "message": w.error or (
                f"the VMM process exited ({rc}) before the VM was ready"
                + (f": {self.stderr_tail[-1]}" if self.stderr_tail else ""))})  # fmt: skip
        self.console_closed()
        self.daemon.weights.release(self.id)
        with contextlib.suppress(OSError):
            w.spec_path.unlink()
        w.exited.set()

    def console_closed(self) -> None:
        self.console.close()

    async def _kill(self, w: Worker, grace: float = 5.0) -> None:
        if not w.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(w.exited.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.exited.wait()

    # --- operations on a running VM ------------------------------------------------------

    async def pause(self) -> None:
        async with self.operation("pause"):
            w = self.live("pause")
            await control_request(w.control, "pause")
            self.state = "Paused"

    async def resume(self) -> None:
        async with self.operation("resume"):
            w = self.live("resume")
            await control_request(w.control, "resume")
            self.state = "Running"

    # The balloon: the control channel's `balloon` operation (docs/memory.md), where it exists.

    async def balloon_target(self, amount_mib: int) -> None:
        b = self.resources.balloon
        if b is None:
            raise ApiError("no balloon device is configured (PUT /balloon before InstanceStart)")
        if amount_mib > self.resources.machine.mem_size_mib:
            raise ApiError(f"amount_mib {amount_mib} is more than the VM's memory "
                           f"({self.resources.machine.mem_size_mib} MiB)")  # fmt: skip
        if self.state in ("Running", "Paused"):
            async with self.operation("PATCH /balloon"):
                w = self.live("PATCH /balloon")
                await control_request(w.control, "balloon", {"size": amount_mib << 20})
        self.resources.balloon = b.model_copy(update={"amount_mib": amount_mib})

    async def balloon_stats(self) -> dict[str, Any]:
        if self.resources.balloon is None:
            raise ApiError("no balloon device is configured")
        w = self.live("GET /balloon/statistics")
        r = await control_request(w.control, "balloon")
        target, actual = int(r.get("target_bytes", 0)), int(r.get("actual_bytes", 0))
        stats = {k: v for k, v in (r.get("guest_stats") or {}).items()
                 if k in M.BALLOON_STAT_NAMES}  # fmt: skip
        return {"target_pages": target >> 12, "actual_pages": actual >> 12,
                "target_mib": target >> 20, "actual_mib": actual >> 20, **stats}  # fmt: skip

    async def ctrl_alt_del(self) -> None:
        async with self.operation("SendCtrlAltDel"):
            w = self.live("SendCtrlAltDel")
            await control_request(w.control, "ctrl_alt_del")

    async def stop(self, grace: float = 10.0) -> None:
        async with self.operation("stop"):
            w = self.worker
            if w is None or not w.alive:
                raise ApiError(f"stop: the VM is {self._state_words()}")
            if not w.ready:  # waiting for a migration, or still starting
                await self._kill(w)
                return
            try:
                await control_request(w.control, "stop", timeout=5.0)
                await asyncio.wait_for(w.exited.wait(), grace)
            except (ApiError, TimeoutError):
                await self._kill(w)

    async def snapshot(self, p: M.SnapshotCreateParams) -> dict[str, Any]:
        async with self.operation("snapshot/create"):
            w = self.live("snapshot/create")
            if p.snapshot_type == "Diff":
                raise ApiError("snapshot_type Diff: kvmpy writes full snapshots only (sparse: "
                               "untouched and zero pages take no space)")  # fmt: skip
            paths = self.resources.paths
            snap = paths.resolve(p.snapshot_path, "snapshot_path")
            mem = paths.resolve(p.mem_file_path, "mem_file_path")
            inside = os.path.join(snap, "memory")
            if mem != inside:
                if mem == snap or mem.startswith(snap + os.sep):
                    raise ApiError("mem_file_path must not be inside snapshot_path (except as "
                                   "its 'memory' file)")  # fmt: skip
                if os.path.isdir(mem):
                    raise ApiError(f"mem_file_path {p.mem_file_path} is a directory")
                if not os.path.isdir(os.path.dirname(mem)):
                    raise ApiError(f"mem_file_path {p.mem_file_path}: no such directory")
            result = await control_request(w.control, "snapshot", {"path": snap}, timeout=300.0)
            if mem != inside:
                tmp = f"{mem}.kvmpy-{os.getpid()}.tmp"
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    try:
                        os.link(inside, tmp)
                    except OSError:  # another file system, or links not allowed: a symlink
                        os.symlink(inside, tmp)
                    os.replace(tmp, mem)
                except OSError as e:
                    raise ApiError(f"the snapshot was written to {p.snapshot_path}, but "
                                   f"mem_file_path {p.mem_file_path}: {e.strerror}") from None  # fmt: skip
            shown = paths.show(snap)
            if shown not in self.snapshots:
                self.snapshots.append(shown)
            return result

    async def migrate(self, p: M.MigrateParams) -> dict[str, Any]:
        async with self.operation("migrate"):
            w = self.live("migrate")
            args: dict[str, Any] = {"address": p.destination}
            if p.downtime_ms is not None:
                args["downtime_ms"] = p.downtime_ms
            if p.max_rounds is not None:
                args["max_rounds"] = p.max_rounds
            if p.auth_key_file is not None:
                from ..errors import KvmpyError
                from ..persist.migration import load_key

                path = self.resources.paths.resolve(p.auth_key_file, "auth_key_file")
                try:
                    key = await asyncio.to_thread(load_key, path)
                except KvmpyError as e:
                    raise ApiError(str(e)) from None
                assert key is not None
                args["auth_key"] = key.hex()
            result = await control_request(w.control, "migrate", args, timeout=120.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.exited.wait(), 10.0)
            return result

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self.state_changes += 1

    async def stats(self) -> dict[str, Any]:
        self.observed = time.monotonic()
        w = self.worker
        d: dict[str, Any] = {
            "id": self.id, "state": self.state, "pid": w.pid if w and w.alive else None,
            "weight": self.weight, "snapshots": list(self.snapshots),
            "console_bytes": self.console.total, "crash": self.crash,
            "listening": self.listening,
        }  # fmt: skip
        if w is not None and w.alive and w.ready:
            changes = self.state_changes
            try:
                s = await w.channel.request("stats")
            except ApiError:
                s = {}
            if s:
                self.last_stats = s
                # The VMM's word, unless the state changed while the answer was on its way
                # (the dashboard's sampler asks while a resume is under way: measured).
                if s.get("state") in ("paused", "running") and changes == self.state_changes:
                    self.state = "Paused" if s["state"] == "paused" else "Running"
            d["state"] = self.state
        s = self.last_stats
        for k in ("uptime_s", "output_bytes", "exits", "vcpu_time_s"):
            if s.get(k) is not None:
                d[k] = s[k]
        if self.result is not None:
            r = self.result
            d["stop"] = {"stop_reason": r.get("stop_reason"), "exit_code": r.get("exit_code"),
                         "message": r.get("message", "")}  # fmt: skip
            d["output_bytes"] = r.get("output_bytes", d.get("output_bytes", 0))
            if r.get("stats"):
                d["exits"] = r["stats"]
            if "migration" in r:
                d["stop"]["migration"] = r["migration"]
        if self.migration is not None:
            d["migration"] = self.migration
        return d

    async def sample(self, t: float) -> None:
        s = await self.stats()
        exits = int((s.get("exits") or {}).get("total", 0))
        cpu = float(sum(s.get("vcpu_time_s") or [0.0]))
        prev = self.samples[-1] if self.samples else None
        dt = t - prev["t"] if prev else 0.0
        self.samples.append({
            "t": round(t, 3), "state": s["state"], "exits": exits,
            "exits_per_s": round((exits - prev["exits"]) / dt, 2) if prev and dt > 0 else 0.0,
            "vcpu_time_s": round(cpu, 6),
            "vcpu_util": round(max(0.0, cpu - prev["vcpu_time_s"]) / dt, 4)
            if prev and dt > 0 else 0.0,
            "output_bytes": int(s.get("output_bytes") or 0),
        })  # fmt: skip

    async def set_weight(self, weight: int) -> None:
        w = self.worker
        if w is not None and w.alive:
            self.daemon.weights.apply(self.id, w.pid, weight)
        self.weight = weight

    def send_input(self, data: bytes) -> bool:
        w = self.worker
        if w is None or not w.alive or w.proc.stdin is None:
            return False
        try:
            w.proc.stdin.write(data)
        except (OSError, RuntimeError):
            return False
        return True

    def takes_input(self) -> bool:
        """Whether the VMM reads console input: a Linux guest's console (its UART, or hvc0),
        an SDK guest's virtio console."""
        return self.resources.boot_kind == "linux" or self.resources.machine.console == "virtio"

    async def flush_metrics(self) -> None:
        mt = self.resources.metrics
        if mt is None:
            raise ApiError("FlushMetrics: no metrics file configured (PUT /metrics first)")
        s = await self.stats()
        doc = {"utc_timestamp_ms": int(time.time() * 1000), "vm": self.id, **s,
               "api": dict(self.daemon.requests)}  # fmt: skip
        line = (json.dumps(doc) + "\n").encode()
        try:
            fd = os.open(mt.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK,
                         0o600)  # fmt: skip
        except OSError as e:
            raise ApiError(f"FlushMetrics: {mt.metrics_path}: {e.strerror}") from None
        try:
            os.write(fd, line)
        except OSError as e:
            raise ApiError(f"FlushMetrics: {mt.metrics_path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def summary(self, base: str) -> dict[str, Any]:
        s = self.last_stats
        w = self.worker
        uptime = s.get("uptime_s", 0.0)
        out = s.get("output_bytes", 0)
        exits = (s.get("exits") or {}).get("total", 0)
        if self.result is not None:
            out = self.result.get("output_bytes", out)
            exits = (self.result.get("stats") or {}).get("total", exits)
        return {"id": self.id, "state": self.state, "base": base, "uptime_s": uptime,
                "output_bytes": out, "exits": exits,
                "pid": w.pid if w is not None and w.alive else None}  # fmt: skip

    async def shutdown(self) -> None:
        w = self.worker
        if w is not None and w.alive:
            await self._kill(w, grace=5.0)


class Daemon:
    """The VMs of one `kvmpy serve`."""

    def __init__(self, *, multi: bool, instance_id: str, paths: PathPolicy, state_dir: str | None):
        self.multi = multi
        self.instance_id = instance_id
        self.paths = paths
        self._own_rundir = state_dir is None
        if state_dir is None:
            import tempfile

            state_dir = tempfile.mkdtemp(prefix="kvmpy-serve-")
        self.rundir = Path(state_dir)
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.weights = CpuWeights(f"kvmpy-serve-{os.getpid()}")
        self.vms: dict[str, Vm] = {}
        self.t0 = time.monotonic()
        self.requests: dict[str, int] = {}
        self._sampler: asyncio.Task | None = None
        if not multi:
            self.vms[instance_id] = Vm(self, instance_id)

    def start(self) -> None:
        self._sampler = asyncio.create_task(self._sample_loop())

    def get(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise ApiError(f"no VM {vm_id!r} here (PUT /vms/{vm_id} creates one)", status=404)
        return vm

    def base(self, vm: Vm) -> str:
        return f"/vms/{vm.id}" if self.multi else ""

    def create(self, vm_id: str) -> Vm:
        if not re.match(M.ID_PATTERN, vm_id):  # it names a directory: never "." or ".."
            raise ApiError(f"a VM id is 1-64 letters, digits, '_', '.' or '-', not starting with "
                           f"'.' (not {vm_id!r})")  # fmt: skip
        if vm_id in self.vms:
            raise ApiError(f"a VM {vm_id!r} exists already")
        if len(self.vms) >= 1024:
            raise ApiError("this daemon has 1024 VMs; delete some first")
        vm = self.vms[vm_id] = Vm(self, vm_id)
        return vm

    async def delete(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.operation("delete"):
            await vm.shutdown()
            self.vms.pop(vm_id, None)
            shutil.rmtree(self.rundir / vm_id, ignore_errors=True)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            jobs = [vm.sample(now - self.t0) for vm in list(self.vms.values())
                    if vm.worker is not None and vm.worker.alive and vm.worker.ready
                    and now - vm.observed < OBSERVE_S]  # fmt: skip
            if jobs:
                for r in await asyncio.gather(*jobs, return_exceptions=True):
                    if isinstance(r, Exception) and not isinstance(r, ApiError):
                        log.warning("sampling failed: %s", one_line(repr(r)))

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        await asyncio.gather(*(vm.shutdown() for vm in self.vms.values()),
                             return_exceptions=True)  # fmt: skip
        self.weights.close()
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

"""The VMM process of one VM under `kvmpy serve`: `python -m kvmpy.api.worker SPEC.json`.

Firecracker runs one process per VM; so does kvmpy's daemon. The daemon writes a spec (what to
build: a VmConfig to boot, a snapshot to restore, or an address to receive a migration on),
starts this module, and talks to it through

* fd `status_fd` (a socketpair): one JSON line per event, from here to the daemon:
  `listening` (a migration destination's address), `ready` (the machine is built and the
  control socket serves), `error` (it could not be built: one sentence), `result` (the run's
  end, as `kvmpy run --json` reports it);
* the control socket (kvmpy.persist.control: pause, resume, stats, snapshot, migrate, stop),
  which `kvmpy ctl` can also use;
* stdout: the guest's console output, byte for byte; stdin: the virtio console's input;
* stderr: this process's log (the daemon keeps the tail for crash reports).

The process asks the kernel to send it SIGTERM when the daemon dies (PR_SET_PDEATHSIG), so no
VM outlives its daemon; SIGTERM stops the VM like Ctrl-C in `kvmpy run`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import stat
import sys
from typing import Any

PR_SET_PDEATHSIG = 1

log = logging.getLogger("kvmpy.api.worker")

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": 5, "off": logging.CRITICAL + 10}  # fmt: skip


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return
    if os.getppid() != parent:  # the daemon died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Status:
    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)

    def send(self, event: str, **fields: Any) -> None:
        try:
            self.sock.sendall(json.dumps({"event": event, **fields}).encode() + b"\n")
        except OSError:
            pass  # the daemon is gone; PDEATHSIG ends this process


def _console_out(data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def _setup_logging(spec: dict) -> None:
    root = logging.getLogger()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("kvmpy: %(levelname)s: %(message)s"))
    root.addHandler(stderr)
    root.setLevel(logging.WARNING)
    lg = spec.get("logger")
    if not lg or not lg.get("log_path"):
        return
    level = LEVELS[(lg.get("level") or "info").lower()]
    fmt = f"%(asctime)s [{spec['name']}:%(threadName)s]"
    if lg.get("show_level"):
        fmt += " %(levelname)s"
    if lg.get("show_log_origin"):
        fmt += " %(pathname)s:%(lineno)d"
    handler = logging.FileHandler(lg["log_path"])
    handler.setFormatter(logging.Formatter(fmt + " %(message)s"))
    handler.setLevel(level)
    if lg.get("module"):
        handler.addFilter(logging.Filter(lg["module"]))
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))


def _connect_console(machine, *, handlers: bool = False):
    """The console's input is this process's stdin (a pipe from the daemon). A Linux guest's
    console is its first UART, or hvc0 when its command line says `console=hvc0` (as `kvmpy
    boot` decides); an SDK guest's is its virtio console. With `handlers`, a booting SDK
    guest's virtio interrupt handlers go into its IDT (as `kvmpy run` does; a restored guest's
    IDT came with its memory). Returns what must be closed with the machine, if anything."""
    if getattr(machine, "linux", None) is not None:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return None
        from ..cli.boot import connect_console, console_mode_of

        return connect_console(machine, 0, interactive=False,
                               virtio=console_mode_of(machine) == "virtio")  # fmt: skip
    vset = getattr(machine, "virtio", None)
    if vset is None:
        return None
    from ..vmm.virtio import install_guest_handlers

    consoles = [d for d in vset.devices if d.kind == "console"]
    if consoles and stat.S_ISFIFO(os.fstat(0).st_mode):
        consoles[0].input_fd = 0  # its I/O thread reads the pipe when it is readable
    if handlers:
        install_guest_handlers(machine, vset)
    return None


def run(spec: dict, status: _Status) -> int:
    from ..errors import KvmpyError
    from ..persist.control import ControlServer
    from ..persist.session import VmSession
    from ..signals import Interrupted

    kind = spec["kind"]
    restored = incoming = con = None
    machine = None
    before_first_run = None
    try:
        if kind == "boot":
            from ..vmm import builder
            from ..vmm.config import VmConfig

            config = VmConfig.from_dict(spec["config"])
            machine = builder.build(config, console=_console_out, capture_output=False)
            con = _connect_console(machine, handlers=True)
        elif kind == "restore":
            from ..persist.snapshot import restore

            restored = restore(spec["snapshot"], lazy_memory=bool(spec.get("lazy")),
                               console=_console_out, capture_output=False)  # fmt: skip
            machine = restored.machine
            before_first_run = restored.mark_first_run
            con = _connect_console(machine)
        elif kind == "receive":
            from ..persist.migration import Incoming, load_key, parse_address

            host, port = parse_address(spec["listen"])
            incoming = Incoming(host, port, key=load_key(spec.get("auth_key_file")))
            h, p = incoming.address
            status.send("listening", address=f"{h}:{p}")
            machine = incoming.receive(console=_console_out, capture_output=False)
            con = _connect_console(machine)
            inc = incoming

            def before_first_run() -> None:
                status.send("migrated-in", migration=inc.running())

        else:
            raise KvmpyError(f"unknown worker kind {kind!r}")
        session = VmSession(machine)
        session.before_first_run = before_first_run
        server = ControlServer(session, spec["control"])
    except Interrupted:
        status.send("error", message="stopped before the VM started")
        _close(machine, restored, incoming, con)
        return 143
    except KvmpyError as e:
        status.send("error", message=str(e))
        _close(machine, restored, incoming, con)
        return 1
    c = machine.config
    log.info("VM %s ready (%s): %s mode, %d MiB, %d vCPU(s), %s backend, devices: %s",
             spec["name"], kind, machine.mode.value, c.memory >> 20, c.vcpus, machine.accel,
             ", ".join(d.id for d in machine.device_configs) or "none")  # fmt: skip
    from ..vmm.virtio import balloon as find_balloon

    balloon = find_balloon(machine)
    status.send("ready", pid=os.getpid(), config=machine.vm_config().to_dict(),
                accel=machine.accel, paused=bool(spec.get("paused")),
                balloon_target_bytes=balloon.num_pages * 4096 if balloon else None)  # fmt: skip
    try:
        result = session.run(None, handle_sigint=True, paused=bool(spec.get("paused")))
    finally:
        server.close()
    log.info("VM %s stopped: %s %s", spec["name"], result.stop_reason.value, result.message)
    doc = result.to_dict()
    doc["output_bytes"] = machine.output_bytes
    if machine.linux is not None:
        doc["linux"] = machine.linux.to_dict()
    if restored is not None:
        doc["restore"] = restored.report()
        if restored.failure is not None:
            doc["restore_failure"] = restored.failure
    status.send("result", result=doc)
    _close(machine, restored, incoming, con)
    return 0


def _close(machine, restored, incoming, con=None) -> None:
    try:
        if con is not None:
            con.close()
        if restored is not None:
            restored.close()
        elif machine is not None:
            machine.close()
        if incoming is not None:
            incoming.close()
    except Exception:
        log.exception("closing the machine failed")


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK,
        {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGUSR1},
    )
    from .. import signals

    signals.install()
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    _setup_logging(spec)
    status = _Status(spec["status_fd"])
    try:
        return run(spec, status)
    except KeyboardInterrupt:
        return 143


if __name__ == "__main__":
    sys.exit(main())

"""One VM of the KSM lab in its own process: `python -m kvmpy.ksm.labvm CONFIG_JSON`.

One VM per process, as kvmpy runs VMs, so /proc/PID/ksm_stat is this VM's. The lab talks to it
over pipes, one JSON object per line:

    stdin   {"go": STEP}        let the guest past STEP (ksm-fill's SYNC hypercall)
            {"stop": true}      stop the VM (so does end of file)
    stdout  {"event": "ready", "pid", "tsc_khz", "ranges": [[hva, size]], "area_hva", ...}
            {"event": "step", "step": STEP, "values": [a, b, c], "t": monotonic seconds}
            {"event": "exit", "stop_reason", "exit_code", "message"}

With "control" in the config it also serves a control socket (`kvmpy ctl`), which the lab
uses for snapshots. The process dies with the lab (PR_SET_PDEATHSIG) and leaves Ctrl-C to it
(the lab starts it in its own session).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from ..hv.signals import helper_thread_signals
from ..kvm._sys import libc
from ..result import StopReason
from .guest import HC_SYNC, FillParams, fill_area, set_params

PR_SET_PDEATHSIG = 1
#: How long the SYNC hypercall waits for the lab before the guest asks again: short enough
#: that a pause (a snapshot) is served at once, long enough that waiting costs nothing.
WAIT_S = 0.05

_out_lock = threading.Lock()


def emit(doc: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = json.loads((argv or sys.argv)[1])
    from ..loader import load_file
    from ..machine import Machine, MachineConfig
    from ..persist.control import serve_and_run
    from ..persist.session import VmSession
    from ..vmm.config import ImageBoot

    params = FillParams(**cfg["params"]).check()
    config = MachineConfig(mode="long-user", memory=cfg["memory"], mergeable=True,
                           name=f"ksm{params.vm_id}", accel="kvm")  # fmt: skip
    with Machine(config) as m:
        image = load_file(cfg["image"])
        area = fill_area(image)
        end = area + params.pages * 4096
        if end > m.config.memory:
            from ..errors import ConfigError

            raise ConfigError(f"{params.pages} pages do not fit in {cfg['memory']} of guest RAM")
        m.load(image, reserved=[(area, end)])
        m.boot_source = ImageBoot(cfg["image"])
        set_params(m, params)

        cond = threading.Condition()
        allowed = [0]
        reported: set[int] = set()

        def hc_sync(ctx, step, a, b, c) -> int:
            if step not in reported:
                reported.add(step)
                emit({"event": "step", "step": step, "values": [a, b, c], "t": time.monotonic()})
            with cond:
                cond.wait_for(lambda: allowed[0] >= step, timeout=WAIT_S)
                return 1 if allowed[0] >= step else 0

        m.hypercalls.register(HC_SYNC, hc_sync, "ksm_lab_sync")

        def commands() -> None:
            helper_thread_signals()
            for line in sys.stdin:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if "go" in doc:
                    with cond:
                        allowed[0] = max(allowed[0], int(doc["go"]))
                        cond.notify_all()
                if doc.get("stop"):
                    break
            m.request_stop(StopReason.INTERRUPTED, "stopped by the lab")

        threading.Thread(target=commands, name="ksm-lab-commands", daemon=True).start()
        emit({
            "event": "ready",
            "pid": os.getpid(),
            "tsc_khz": m.vcpus[0].fd.get_tsc_khz(),
            "ranges": [[r.hva, r.size] for r in m.memory.regions],
            "area_gpa": area,
            "area_hva": m.memory.gpa_to_hva(area),
            "pages": params.pages,
        })  # fmt: skip
        result = serve_and_run(VmSession(m), cfg.get("control"), cfg.get("timeout"))
        emit({
            "event": "exit",
            "stop_reason": result.stop_reason.value,
            "exit_code": result.exit_code,
            "message": result.message,
            "output": result.output.decode(errors="replace")[-2000:],
        })  # fmt: skip
    return 0


def _main() -> int:
    from ..errors import KvmpyError

    try:
        return main()
    except KvmpyError as e:
        emit({"event": "error", "message": str(e)})
        return 1


if __name__ == "__main__":
    sys.exit(_main())

"""A damaged memory file is refused, every page of it, by an eager restore and by a lazy one
(issue 8): a lazily restored guest never runs on a page that failed its checksum, and one
the guest has not touched stops the VM within about a second too."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import snapshot
from kvmpy.persist.errors import SnapshotError
from kvmpy.result import StopReason

pytestmark = pytest.mark.kvm

PAGE = 4096


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory):
    """A 1 MiB guest spinning at CPL3 (`jmp .`), with data in a few places: 256 pages, some
    in the file's extents, the rest holes."""
    path = tmp_path_factory.mktemp("damage") / "snap"
    with Machine(MachineConfig(mode="long-user", memory="1M")) as m:
        m.load(load_raw(b"\xeb\xfe", load_addr=0x10000, entry=0x10000))
        m.memory.write(0x20000, os.urandom(40 * PAGE))
        m.memory.write(0x60000 + 123, b"lonely")
        snapshot.take(m, path)
    return path


def damaged_copy(src, dst, page: int):
    shutil.copytree(src, dst)
    with open(dst / "memory", "r+b") as f:
        f.seek(page * PAGE + 7)
        old = f.read(1) or b"\0"
        f.seek(page * PAGE + 7)
        f.write(bytes([old[0] ^ 0xFF]))
    return dst


def test_every_damaged_page_is_refused_eagerly_and_lazily(small_snapshot, tmp_path):
    pages = os.path.getsize(small_snapshot / "memory") // PAGE
    assert pages == 256
    lazy_stops = []
    for page in range(pages):
        path = damaged_copy(small_snapshot, tmp_path / f"p{page}", page)
        with pytest.raises(SnapshotError, match=r"the memory file is corrupted: pages \d+-\d+"):
            snapshot.restore(path).close()
        r = snapshot.restore(path, lazy_memory=True)
        try:
            r.mark_first_run()
            t0 = time.monotonic()
            result = r.machine.run(timeout=10)
            took = time.monotonic() - t0
        finally:
            r.close()
        assert result.stop_reason is StopReason.VMM_ERROR, (page, result.message)
        assert r.failure and r.failure.startswith("the memory file is corrupted: pages"), page
        assert _in_range(page, r.failure), (page, r.failure)
        lazy_stops.append(took)
        shutil.rmtree(path)
    assert max(lazy_stops) < 1.5, max(lazy_stops)


def _in_range(page: int, message: str) -> bool:
    first, last = message.split("pages ")[1].split(" ")[0].split("-")
    return int(first) <= page <= int(last)


def test_the_cli_gives_the_same_line_for_eager_and_lazy(small_snapshot, tmp_path):
    import subprocess
    import sys

    path = damaged_copy(small_snapshot, tmp_path / "s", 0x20)
    lines = []
    for extra in ([], ["--lazy"]):
        r = subprocess.run([sys.executable, "-m", "kvmpy", "restore", str(path), "--timeout",
                            "10", *extra], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvmpy: error:"), r.stderr
        lines.append(r.stderr)
    assert lines[0] == lines[1]
    assert "the memory file is corrupted: pages 32-" in lines[0]


@pytest.mark.parametrize("when", ["before the run", "while a fault waits"])
def test_a_killed_handler_stops_the_vm_instead_of_zero_pages(small_snapshot, when):
    import signal
    import threading

    r = snapshot.restore(small_snapshot, lazy_memory=True, lazy_background=False)
    pid = r.loader.process.pid
    try:
        if when == "before the run":
            os.kill(pid, signal.SIGKILL)
        else:
            # Stopped, the handler serves nothing: the vCPU's first fetch waits in KVM, and
            # the handler is killed under it.
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        r.mark_first_run()
        t0 = time.monotonic()
        result = r.machine.run(timeout=10)
        took = time.monotonic() - t0
    finally:
        r.close()
    assert result.stop_reason is StopReason.VMM_ERROR, result.message
    assert "handler process died (killed by signal 9)" in result.message
    assert took < 5

"""Driving a Linux guest through kvmpy's command line, as a user would: a `kvmpy` process
with its console on pipes, commands typed into the guest's shell, answers read back.

    g = GuestProcess(["boot", "microvm", "--vcpus", "2", "--json"])
    g.wait_for(b"kvmpy-init: ready", 900)
    assert g.sh("nproc") == "2"
    g.type("poweroff -f")
    rc, doc = g.finish(120)        # exit status and the --json object
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmpy.boot.initramfs import INIT_MARKER

READY = INIT_MARKER.encode()


class GuestError(AssertionError):
    pass


class GuestProcess:
    def __init__(self, args: list[str], *, env: dict | None = None, cwd: str | None = None):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )  # fmt: skip
        self.out = bytearray()
        self.err = bytearray()
        self._cond = threading.Condition()
        self._n = 0
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            data = stream.read1(65536)
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                buf += data
                self._cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> int:
        """Wait until `pattern` appears in stdout at or after `start`; returns the offset just
        past it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self.out.find(pattern, start)
                if i >= 0:
                    return i + len(pattern)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive()):
                    raise GuestError(
                        f"{pattern!r} did not appear within {timeout:g} s (kvmpy "
                        f"{'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'}"
                        f"); last output:\n{self.tail()}\nstderr:\n{self.err.decode(errors='replace')[-2000:]}"
                    )  # fmt: skip
                self._cond.wait(min(left, 1.0))

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def tail(self, n: int = 3000) -> str:
        return self.out[-n:].decode(errors="replace")

    def type(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def sh(self, command: str, timeout: float = 300.0) -> str:
        """Type `command` into the guest's shell and return what it printed (stripped). The end
        marker is computed by the guest's shell, so the echo of the typed line cannot match."""
        self._n += 1
        n = 1000 + self._n
        with self._cond:
            start = len(self.out)
        self.type(f"{command}; echo @@$(({n}))@@")
        end = self.wait_for(f"@@{n}@@".encode(), timeout, start)
        text = self.out[start : end - len(f"@@{n}@@")].decode(errors="replace")
        # Drop everything up to the echo of the typed line (the shell's line editor may put
        # carriage returns and escape sequences into it; a banner may come before it).
        text = strip_ansi(text.replace("\r", ""))
        marker_line = f"echo @@$(({n}))@@"
        i = text.rfind(marker_line)
        if i >= 0:
            text = text[i + len(marker_line) :]
        return text.strip("\n").strip()

    def finish(self, timeout: float) -> tuple[int, dict | None]:
        """Wait for kvmpy to exit; returns its status and the --json object, if any."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(
                f"kvmpy did not exit within {timeout:g} s; last output:\n{self.tail()}"
            ) from None
        for t in self._threads:
            t.join(10)
        return rc, last_json(bytes(self.out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def last_json(out: bytes) -> dict | None:
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith(b"{") and line.endswith(b"}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def make_ext4(path: Path, files: dict[str, str], size_mb: int = 16) -> None:
    src = path.parent / (path.name + ".d")
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(path), f"{size_mb}M"],
                   check=True, capture_output=True)  # fmt: skip


def ext4_cat(image: Path, name: str) -> str | None:
    """A file's contents from an ext4 image, read on the host (debugfs, no mount)."""
    r = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True)
    if r.returncode != 0 or b"File not found" in r.stderr:
        return None
    return r.stdout.decode(errors="replace")


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)

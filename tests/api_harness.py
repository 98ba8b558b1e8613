"""A `kvmpy serve` daemon for tests, and plain HTTP/1.1 over its Unix socket (what curl
--unix-socket sends), so the tests see the wire, not a client library.

Every daemon is stopped at the end with SIGTERM, and every VMM process it started must be gone
afterwards (the fixture kills and fails on any that is not)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

KVMPY = [sys.executable, "-m", "kvmpy"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Daemon:
    def __init__(self, tmp: Path, *args: str, name: str = "api", env: dict | None = None,
                 preexec=None, prefix: tuple[str, ...] = ()):  # fmt: skip
        self.tmp = tmp
        self.sock = str(tmp / f"{name}.sock")
        self.stderr_path = tmp / f"{name}.stderr"
        self.args = args
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            # `prefix` runs it through e.g. `ip netns exec NS`, which execs it (same pid).
            [*prefix, *KVMPY, "serve", "--api-sock", self.sock, *args],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err,
            env={**os.environ, **(env or {})}, preexec_fn=preexec,
        )  # fmt: skip
        self.pids: set[int] = set()
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock) or not self._connects():
            if self.proc.poll() is not None:
                raise AssertionError(f"kvmpy serve exited: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError("kvmpy serve did not start")
            time.sleep(0.05)

    def _connects(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def http(self, method: str, path: str, body=None, *, raw: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict | str | None]:  # fmt: skip
        conn = UnixHTTPConnection(self.sock)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            h = {"Accept": "application/json"}
            if data is not None:
                h["Content-Type"] = "application/json"
            h.update(headers or {})
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            text = r.read().decode()
            ctype = r.getheader("content-type") or ""
            doc = json.loads(text) if text and "json" in ctype else (text or None)
            if isinstance(doc, dict) and isinstance(doc.get("pid"), int):
                self.pids.add(doc["pid"])
            return r.status, doc
        finally:
            conn.close()

    def ok(self, method: str, path: str, body=None):
        status, doc = self.http(method, path, body)
        assert 200 <= status < 300, f"{method} {path} -> {status} {doc}"
        return doc

    def wait_state(self, base: str, state: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.ok("GET", f"{base}/vm/stats")
            if doc["state"] == state:
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"{base}: state {doc['state']}, not {state}: {doc}")
            time.sleep(0.1)

    def wait_output(self, base: str, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.ok("GET", f"{base}/console/tail?bytes=262144")
            if needle in doc["data"]:
                return doc["data"]
            if time.monotonic() > deadline:
                raise AssertionError(f"{base}: no {needle!r} in the console: {doc['data'][-500:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        leftover = [p for p in self.pids if _alive(p)]
        for p in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        assert not leftover, f"VMM processes outlived their daemon: {leftover}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kvmpy.api.worker" in f.read()
    except OSError:
        return False


def ticker_image() -> str:
    from kvmpy.sdk.examples import find_example

    example = find_example("ticker")
    assert example is not None
    return str(example.build())


def tick_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "tick" and parts[2] == "sum":
            out.append((int(parts[1]), parts[3]))
    return out


def expected_ticks(n: int) -> list[tuple[int, str]]:
    """What the ticker prints for its first n ticks (its checksum chain, in Python)."""
    s = 0x6B766D7079
    out = []
    for line in range(1, n + 1):
        s = ((s ^ line) * 0x100000001B3) & ((1 << 64) - 1)
        out.append((line, f"{s:016x}"))
    return out


def check_ticks(text: str, first: int | None = 1) -> tuple[int, int]:
    """The complete tick lines in `text` follow each other without a gap or a repeat, from
    `first` (None: from wherever the text starts), each with the right checksum; returns the
    first and last tick numbers."""
    lines = tick_lines(text)
    assert lines, f"no tick lines in {text[:200]!r}"
    want = expected_ticks(lines[-1][0])
    if first is not None:
        assert lines[0][0] == first, f"the ticks start at {lines[0][0]}, not {first}"
    for (n, _s), (m, _) in zip(lines, lines[1:], strict=False):
        assert m == n + 1, f"tick {n} is followed by tick {m}"
    for n, s in lines:
        assert want[n - 1] == (n, s), f"tick {n} has the wrong checksum"
    return lines[0][0], lines[-1][0]

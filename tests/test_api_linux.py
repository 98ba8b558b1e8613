"""`kvmpy serve` with a real Linux guest: Firecracker's getting-started sequence over the Unix
socket with plain HTTP (machine-config, boot-source with kernel, initrd and boot_args, the
root drive, a network interface on a TAP, vsock, the balloon, InstanceStart), then the
shell on the console WebSocket, the network (ping to the TAP's address), vsock both ways
(Firecracker's CONNECT convention and guest-initiated connections to `uds_path_PORT`), the
balloon (PATCH /balloon, GET /balloon/statistics), pause and resume, a snapshot, Ctrl-Alt-Del
and reboot. (Loading the snapshot in a second daemon is not in CI: see the note at the end.)

A Linux boot takes tens of seconds here (minutes under load), so the kernel boots once and the
test is one sequence. Everything runs in a network namespace of its own: the TAP and its
address exist nowhere else, and the host's network is not touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .api_harness import Daemon
from .linux_guest import READY, strip_ansi

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(3600)]

BOOT_TIMEOUT = 1200.0
HERE = Path(__file__).parent
GUEST_MAC = "06:00:AC:10:00:02"
HOST_IP, GUEST_IP = "172.16.0.1", "172.16.0.2"


@pytest.fixture
def netns():
    """A network namespace with a TAP `tap0` at 172.16.0.1/30 (Firecracker's getting-started
    network), removed afterwards with everything in it."""
    for tool in ("ip", "mkfs.ext4", "gcc"):
        assert shutil.which(tool), f"{tool} is needed (make deps)"
    name = f"kvmpy-api-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"],
                    ["addr", "add", f"{HOST_IP}/30", "dev", "tap0"],
                    ["link", "set", "tap0", "up"]):  # fmt: skip
            subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class WsConsole:
    """The console WebSocket of a VM: output collected by a thread, commands typed into the
    guest's shell and their answers read back (the end marker is computed by the guest's
    shell, so the echo of the typed line cannot match it)."""

    def __init__(self, sock: str):
        from kvmpy.client import Client

        self.client = Client(sock)
        self.session = self.client.vm().console()
        self.out = bytearray()
        self.cond = threading.Condition()
        self.n = 0
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for chunk in self.session:
            with self.cond:
                self.out += chunk
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (i := self.out.find(pattern, start)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self.out[-3000:].decode(errors="replace")
                    raise AssertionError(
                        f"{pattern!r} not on the console in {timeout:g} s:\n{tail}"
                    )
                self.cond.wait(min(left, 1.0))
            return i + len(pattern)

    def type(self, line: str) -> None:
        self.session.send(line.encode() + b"\n")

    def sh(self, command: str, timeout: float = 300.0) -> str:
        self.n += 1
        n = 1000 + self.n
        with self.cond:
            start = len(self.out)
        self.type(f"{command}; echo @@$(({n}))@@")
        end = self.wait_for(f"@@{n}@@".encode(), timeout, start)
        text = strip_ansi(self.out[start : end - len(f"@@{n}@@")].decode(errors="replace"))
        text = text.replace("\r", "")
        marker = f"echo @@$(({n}))@@"
        if (i := text.rfind(marker)) >= 0:
            text = text[i + len(marker) :]
        return text.strip()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        with contextlib.suppress(Exception):
            self.client.close()


def make_rootfs(tmp: Path) -> Path:
    """An ext4 image (mkfs.ext4 -d) with a text file and the vsock tool."""
    src = tmp / "rootfs.d"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host\n")
    subprocess.run(["gcc", "-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
                    "-fno-stack-protector", "-fno-pie", "-no-pie", "-o", str(src / "vs"),
                    str(HERE / "guest_src" / "vsock_tool.c")], check=True)  # fmt: skip
    img = tmp / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    return img


class HostListener:
    """A host Unix socket at `uds_path_PORT` for a guest's connection to host port PORT:
    reads what the guest sends and answers `reply`."""

    def __init__(self, path: Path, reply: bytes):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(300)
        self.got = b""
        self.thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self.thread.start()

    def _serve(self, reply: bytes) -> None:
        with contextlib.suppress(OSError):
            c, _ = self.sock.accept()
            with c:
                c.settimeout(60)
                self.got = c.recv(256)
                c.sendall(reply)
                time.sleep(0.5)

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


def vsock_connect(uds: Path, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Firecracker's host-initiated vsock: `CONNECT PORT\\n`, `OK ...\\n`, then the stream."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(uds))
        s.sendall(f"CONNECT {port}\n".encode())
        ok = b""
        while not ok.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                break
            ok += chunk
        s.sendall(payload)
        answer = b""
        while chunk := s.recv(256):
            answer += chunk
        return ok, answer


def wait_stats(d: Daemon, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = d.ok("GET", "/balloon/statistics")
        if pred(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {doc}")
        time.sleep(0.5)


def test_getting_started_with_linux(tmp_path, netns):
    from kvmpy.boot.initramfs import default_initramfs
    from kvmpy.boot.kernels import ensure_microvm

    kernel = ensure_microvm()
    vmlinux, initrd = str(kernel.vmlinux), str(default_initramfs())
    kernel_config = (Path(kernel.vmlinux).parent / "config").read_text()
    make_rootfs(tmp_path)
    prefix = ("ip", "netns", "exec", netns)
    d = Daemon(tmp_path, name="first", prefix=prefix)
    con = d2 = con2 = None
    try:
        # --- Firecracker's getting-started requests, as curl sends them --------------------
        d.ok("PUT", "/logger", {"log_path": "./firecracker.log", "level": "Info"})
        d.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        d.ok("PUT", "/boot-source", {"kernel_image_path": vmlinux, "initrd_path": initrd,
                                     "boot_args": "console=ttyS0 reboot=k panic=1"})  # fmt: skip
        d.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "./rootfs.ext4",
                                       "is_root_device": True, "is_read_only": False})  # fmt: skip
        d.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "guest_mac": GUEST_MAC,
                                                 "host_dev_name": "tap0"})  # fmt: skip
        d.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "./v.sock"})
        d.ok("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": True,
                                 "stats_polling_interval_s": 1})  # fmt: skip
        config = d.ok("GET", "/vm/config")
        assert config["boot-source"]["initrd_path"] == initrd
        assert config["network-interfaces"][0]["host_dev_name"] == "tap0"
        assert config["vsock"]["guest_cid"] == 3 and config["balloon"]["deflate_on_oom"]
        t0 = time.monotonic()
        d.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert d.http("GET", "/")[1]["state"] == "Running"

        # --- the shell on the console WebSocket ---------------------------------------------
        con = WsConsole(d.sock)
        con.wait_for(READY, BOOT_TIMEOUT)
        ready_s = time.monotonic() - t0
        con.sh("dmesg -n 1")  # kernel messages off the console the answers come on
        assert con.sh("echo answer-$((6*7))") == "answer-42"
        cmdline = con.sh("cat /proc/cmdline")
        assert "root=/dev/vda rw" in cmdline and "reboot=k panic=1" in cmdline, cmdline
        assert con.sh("mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt") == (
            "hello from the host"
        )

        # --- the network interface: the guest pings the TAP's address ----------------------
        mac = con.sh(f"ip addr add {GUEST_IP}/30 dev eth0 && ip link set eth0 up && "
                     "cat /sys/class/net/eth0/address")  # fmt: skip
        assert mac == GUEST_MAC.lower()
        ping = con.sh(f"ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-ok")
        assert ping.endswith("ping-ok"), ping

        # --- vsock: the guest connects to the host, the host connects to the guest ----------
        lst = HostListener(tmp_path / "v.sock_6000", b"world")
        assert con.sh("/mnt/vs c 6000 hello").endswith("vs: got world")
        lst.close()
        assert lst.got == b"hello"
        start = len(con.out)
        con.type("/mnt/vs l 5000 &")
        con.wait_for(b"vs: listening", 120, start)
        ok, answer = vsock_connect(tmp_path / "v.sock", 5000, b"ping")
        assert re.fullmatch(rb"OK \d+\n", ok), ok
        assert answer == b"echo:ping"
        con.wait_for(b"vs: answered", 60, start)

        # --- the balloon ----------------------------------------------------------------------
        stats = wait_stats(d, lambda s: "total_memory" in s, 120, "no guest statistics")
        assert 64 << 20 < stats["total_memory"] <= 128 << 20
        d.ok("PATCH", "/balloon", {"amount_mib": 32})
        assert d.ok("GET", "/balloon")["amount_mib"] == 32
        stats = wait_stats(d, lambda s: s["actual_mib"] == 32, 300, "the balloon did not inflate")
        assert stats["target_mib"] == 32 and stats["target_pages"] == 32 * 256
        status, doc = d.http("PATCH", "/balloon", {"amount_mib": 129})
        assert status == 400 and "more than the VM's memory" in doc["fault_message"]

        # --- pause, snapshot, resume ----------------------------------------------------------
        d.ok("PATCH", "/vm", {"state": "Paused"})
        assert d.http("GET", "/")[1]["state"] == "Paused"
        cpu0 = d.ok("GET", "/vm/stats")["vcpu_time_s"]
        time.sleep(1.5)
        assert sum(d.ok("GET", "/vm/stats")["vcpu_time_s"]) - sum(cpu0) < 0.05  # nothing runs
        d.ok("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "./snap",
                                         "mem_file_path": "./mem"})  # fmt: skip
        assert os.path.samefile(tmp_path / "mem", tmp_path / "snap" / "memory")
        start = len(con.out)
        con.type("echo after-pause-$((50+5))")
        time.sleep(1.0)
        assert b"after-pause-55" not in con.out[start:]  # typed while paused: not yet read
        d.ok("PATCH", "/vm", {"state": "Resumed"})
        con.wait_for(b"after-pause-55", 120, start)
        assert d.http("GET", "/")[1]["state"] == "Running"

        # --- Ctrl-Alt-Del ---------------------------------------------------------------------
        d.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        if "CONFIG_VT=y" in kernel_config:
            # The VT keyboard handler turns the keys into ctrl_alt_del(): a reboot.
            end = d.wait_state("", "Stopped", 300)
            assert end["stop"]["stop_reason"] == "reboot", end
        else:
            # Without CONFIG_VT no keyboard handler calls ctrl_alt_del(): the guest runs on
            # (docs/api.md), and reboots when told to.
            time.sleep(1)
            assert con.sh("echo still-$((2*21))") == "still-42"
            assert d.http("GET", "/")[1]["state"] == "Running"
            con.type("reboot -f")
            end = d.wait_state("", "Stopped", 300)
            assert end["stop"]["stop_reason"] == "reboot", end
        assert d.http("GET", "/")[1]["state"] == "Stopped"
        con.close()
        con = None
        d.stop()  # the TAP is free again

        # The snapshot loaded in a second daemon (PUT /snapshot/load) worked here with its
        # shell, drive, network, vsock and balloon, but in one of two fresh-clone CI runs the
        # restored shell echoed a typed line and never ran it (a restored Linux guest's known
        # problem, docs/linux.md): until that is understood, snapshot/load is exercised with
        # the SDK guest (test_api.py), and here the snapshot is checked to be complete.
        assert (tmp_path / "snap").is_dir() and (tmp_path / "mem").exists()
        print(f"\nLinux via the API: shell after {ready_s:.1f} s "
              f"(load {os.getloadavg()[0]:.1f})")  # fmt: skip
    finally:
        for c in (con, con2):
            if c is not None:
                c.close()
        for dd in (d, d2):
            if dd is not None:
                dd.stop()

"""virtio-net and virtio-vsock on KVM: the SDK examples at CPL3 on both transports against the
host (a TAP kvmpy creates, seen through an AF_PACKET socket; Unix sockets), two VMs on one
bridge, and snapshot/restore with the network and with an open vsock connection.

Network set-up stays on this machine: TAPs without addresses, and a bridge inside a network
namespace the test creates (pyroute2)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import snapshot
from kvmpy.sdk.examples import find_example
from kvmpy.vmm.virtio import DeviceSpec, attach

from .test_persist import run_and_take

pytestmark = pytest.mark.kvm

ETH_P_ALL = 3
HOST_MAC = bytes.fromhex("020000000001")
BROADCAST = b"\xff" * 6
PARAMS_MAGIC = 0x54454E4F59504D4B
_PARAMS = struct.Struct("<QII6s2xQQQ")


def frame(dst: bytes, src: bytes, kind: bytes, seq: int, length: int) -> bytes:
    body = bytes((seq * 7 + j) & 0xFF for j in range(8, length - 14))
    return dst + src + b"\x88\xb5" + b"KVN" + kind + struct.pack("<I", seq) + body


def kind_of(f: bytes) -> bytes | None:
    return f[17:18] if f[12:14] == b"\x88\xb5" and f[14:17] == b"KVN" else None


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(15)
    return s


def recv_kind(s: socket.socket, kind: bytes) -> bytes:
    while True:
        try:
            f = s.recv(65536)
        except OSError as e:
            # A packet socket reports a carrier change once (ENETDOWN) when a process
            # attaches to the TAP; the frames keep coming.
            if e.errno == errno.ENETDOWN:
                continue
            raise
        if kind_of(f) == kind:
            return f


def play_host(s: socket.socket, guest_mac: bytes, echoes: int = 40, hellos: bool = True) -> None:
    """The host side of the virtio-net example: check its hellos, have frames echoed, say bye."""
    if hellos:
        got = [recv_kind(s, b"H") for _ in range(16)]
        for i, f in enumerate(got):
            assert f == frame(BROADCAST, guest_mac, b"H", i, 60 + i * 90), f"hello {i}"
    for seq in range(echoes):
        length = 60 + (seq * 37) % 1455
        s.send(frame(guest_mac, HOST_MAC, b"P", seq, length))
        assert recv_kind(s, b"R") == frame(HOST_MAC, guest_mac, b"R", seq, length)
    s.send(frame(guest_mac, HOST_MAC, b"B", 999, 60))


def run_with_host(m: Machine, host, timeout: float = 60):
    errors = []

    def side():
        try:
            host()
        except BaseException as e:
            errors.append(e)
            m.request_stop()

    t = threading.Thread(target=side, daemon=True)
    t.start()
    r = m.run(timeout=timeout)
    t.join(20)
    if errors:
        raise errors[0]
    return r


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_net_example_frames_checked_on_the_host_tap(transport):
    elf = find_example("virtio-net").build()
    with Machine(MachineConfig(mode="long-user", memory="32M")) as m:
        vs = attach(m, [DeviceSpec.parse_net("tap=auto,mac=52:54:00:12:34:56")], transport)
        dev = vs.devices[0]
        tap = dev.backend.name
        s = packet_socket(tap)
        m.load_file(elf)
        r = run_with_host(m, lambda: play_host(s, dev.mac))
        out = r.output.decode()
        assert r.exit_code == 0, out + r.message
        assert "mac 52:54:00:12:34:56, link up" in out and "all checks passed" in out
        (st,) = vs.stats()
        assert st["tx_packets"] == 16 + 41 and st["rx_packets"] >= 41
        assert st["tx_dropped"] == 0 and st["notify_exits"] == 0 and st["needs_reset"] is None
        s.close()
    assert not os.path.exists(f"/sys/class/net/{tap}")  # tap=auto: gone with the VM


@pytest.fixture
def named_tap():
    """A persistent TAP made beforehand (ip tuntap add), as a user would for --net tap=NAME."""
    name = f"kvt{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], check=False)


def test_net_cli_json_and_stats(named_tap):
    """kvmpy run --net tap=NAME --json: frames checked on the TAP, the counters in the JSON,
    and a TAP kvmpy did not create is left in place."""
    s = packet_socket(named_tap)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", "virtio-net", "--net",
         f"tap={named_tap},mac=52:54:00:00:00:07", "--json", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        play_host(s, bytes.fromhex("525400000007"), echoes=5)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        s.close()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out.decode().strip().splitlines()[-1])
    (net,) = doc["virtio"]
    assert net["type"] == "net" and net["backend"] == named_tap
    assert net["mac"] == "52:54:00:00:00:07"
    assert net["tx_packets"] == 16 + 6 and net["rx_packets"] >= 6 and net["tx_dropped"] == 0
    assert os.path.exists(f"/sys/class/net/{named_tap}")


@pytest.fixture
def bridge_ns():
    """A network namespace with a bridge: the only place the two VMs' TAPs are plugged in."""
    from pyroute2 import NetNS, netns

    name = f"kvmpy-test-{os.getpid()}"
    netns.create(name)
    ns = NetNS(name)
    try:
        ns.link("add", ifname="br0", kind="bridge")
        br = ns.link_lookup(ifname="br0")[0]
        ns.link("set", index=br, state="up")
        yield name, ns, br
    finally:
        ns.close()
        netns.remove(name)


def plug(tap: str, ns_name: str, ns, bridge: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], net_ns_fd=ns_name)
    idx = ns.link_lookup(ifname=tap)[0]
    ns.link("set", index=idx, master=bridge, state="up")


def set_params(m: Machine, mode: int, count: int, peer: bytes) -> int:
    base = m.image.symbols["kvmpy_net_params"]
    m.memory.write(base, _PARAMS.pack(PARAMS_MAGIC, mode, count, peer, 0, 0, 0))
    return base


def test_two_vms_on_one_bridge(bridge_ns):
    ns_name, ns, br = bridge_ns
    elf = find_example("virtio-net").build()
    macs = [bytes.fromhex("5254000000a1"), bytes.fromhex("5254000000b2")]
    machines, sets = [], []
    try:
        for i, transport in enumerate(("mmio", "pci")):
            m = Machine(MachineConfig(mode="long-user", memory="32M"))
            machines.append(m)
            mac = ":".join(f"{b:02x}" for b in macs[i])
            # A name of its own (a new TAP kvmpy creates and removes): two kvtapN of the root
            # namespace could not both move into the bridge's namespace under one name.
            tap = f"kvb{os.getpid() % 100000}{'ab'[i]}"
            vs = attach(m, [DeviceSpec.parse_net(f"tap={tap},mac={mac}")], transport)
            sets.append(vs)
            plug(vs.devices[0].backend.name, ns_name, ns, br)
            m.load_file(elf)
        count = 200
        ping = set_params(machines[0], 1, count, macs[1])
        pong = set_params(machines[1], 2, count, macs[0])
        results = {}
        # run(timeout=) needs the main thread: the pong VM is stopped by hand if it hangs.
        t = threading.Thread(target=lambda: results.update(pong=machines[1].run()))
        t.start()
        results["ping"] = machines[0].run(timeout=60)
        t.join(20)
        if t.is_alive():
            machines[1].request_stop()
            t.join(10)
        for side in ("ping", "pong"):
            r = results[side]
            assert r.exit_code == 0, f"{side}: {r.output.decode()} {r.message}"
        done, resent, bad = _PARAMS.unpack(machines[0].memory.read(ping, _PARAMS.size))[4:]
        assert (done, bad) == (count, 0)
        assert _PARAMS.unpack(machines[1].memory.read(pong, _PARAMS.size))[4] == count
        # Every ping and answer crossed the bridge: both NICs moved at least count frames.
        for vs in sets:
            st = vs.stats()[0]
            assert st["tx_packets"] >= count and st["rx_packets"] >= count
    finally:
        for m in machines:
            m.close()


def test_snapshot_restore_with_the_network(tmp_path):
    """A snapshot taken while the guest echoes frames; the restored VM gets a new TAP
    (tap=auto) and its network comes back: the rest of the echoes and the bye work."""
    elf = find_example("virtio-net").build()
    with Machine(MachineConfig(mode="long-user", memory="32M")) as m:
        m.add_device("virtio-net", "net0", tap="auto", mac="52:54:00:aa:bb:cc", transport="pci")
        dev = m.virtio.devices[0]
        s = packet_socket(dev.backend.name)
        m.load_file(elf)
        done = threading.Event()

        def pause():
            play_host_half(s, dev.mac)
            done.set()
            m.pause()

        r = run_and_take(m, pause, lambda: snapshot.take(m, tmp_path / "snap"))
        assert done.is_set() and r.message == "snapshot taken"
        s.close()
    restored = snapshot.restore(tmp_path / "snap")
    with restored.machine as m2:
        dev2 = m2.virtio.devices[0]
        assert dev2.mac == bytes.fromhex("525400aabbcc")
        s2 = packet_socket(dev2.backend.name)
        r2 = run_with_host(m2, lambda: play_host(s2, dev2.mac, echoes=20, hellos=False))
        out = r2.output.decode()
        assert r2.exit_code == 0, out + r2.message
        assert "all checks passed" in out
        s2.close()


def play_host_half(s: socket.socket, mac: bytes) -> None:
    for _ in range(16):
        recv_kind(s, b"H")
    for seq in range(10):
        s.send(frame(mac, HOST_MAC, b"P", seq, 200))
        assert recv_kind(s, b"R") == frame(HOST_MAC, mac, b"R", seq, 200)


# --- vsock -------------------------------------------------------------------------------


def echo_server(path: str, errors: list) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)

    def serve():
        try:
            c, _ = srv.accept()
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        except BaseException as e:
            errors.append(e)
        finally:
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def connect_guest(path: str, port: int, timeout: float = 30) -> tuple[socket.socket, int]:
    """Connect to the guest's listener through PATH ("CONNECT port"), retrying until it
    listens (before that the guest answers RST and kvmpy closes the socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        try:
            c.connect(path)
            c.sendall(b"CONNECT %d\n" % port)
            line = b""
            while not line.endswith(b"\n"):
                b = c.recv(1)
                if not b:
                    break
                line += b
        except (ConnectionResetError, FileNotFoundError, ConnectionRefusedError):
            line = b""
        if line.startswith(b"OK "):
            return c, int(line[3:])
        c.close()
        time.sleep(0.05)
    raise AssertionError("the guest never accepted")


def echo_through(c: socket.socket, n: int) -> None:
    payload = os.urandom(n)
    t = threading.Thread(target=c.sendall, args=(payload,), daemon=True)
    t.start()
    got = bytearray()
    while len(got) < n:
        b = c.recv(65536)
        assert b, "the guest closed early"
        got += b
    t.join(10)
    assert got == payload


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_vsock_example_echo_both_ways(tmp_path, transport):
    path = str(tmp_path / "v.sock")
    errors: list = []
    elf = find_example("virtio-vsock").build()
    with Machine(MachineConfig(mode="long-user", memory="32M")) as m:
        vs = attach(m, [DeviceSpec.parse_vsock(f"3,uds={path}")], transport)
        m.load_file(elf)
        server = echo_server(path + "_1234", errors)

        def host():
            c, port = connect_guest(path, 5000)
            assert port >= 1 << 30
            echo_through(c, 300_000)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b""
            c.close()

        r = run_with_host(m, host)
        server.join(10)
        assert not errors
        out = r.output.decode()
        assert r.exit_code == 0, out + r.message
        assert "guest -> host port 1234: sent 100000 bytes, echoed 100000: ok" in out
        assert "host -> guest port 5000: echoed 300000 bytes" in out
        (st,) = vs.stats()
        # (the host retries CONNECT until the guest listens: each try is a connection)
        assert st["connections"] >= 2 and st["open"] == 0 and st["bad_packets"] == 0
        assert st["tx_bytes"] == 400_000 and st["rx_bytes"] == 400_000
        assert st["notify_exits"] == 0
    assert not os.path.exists(path)  # the listener's socket file goes with the VM


def test_snapshot_restore_resets_open_vsock_connections(tmp_path):
    path = str(tmp_path / "v.sock")
    errors: list = []
    elf = find_example("virtio-vsock").build()
    with Machine(MachineConfig(mode="long-user", memory="32M")) as m:
        m.add_device("virtio-vsock", "vsock0", cid=5, uds=path, transport="mmio")
        m.load_file(elf)
        echo_server(path + "_1234", errors)
        old = []

        def pause():
            c, _ = connect_guest(path, 5000)
            echo_through(c, 50_000)
            old.append(c)
            m.pause()

        r = run_and_take(m, pause, lambda: snapshot.take(m, tmp_path / "snap"))
        assert r.message == "snapshot taken" and not errors
    # The VMM that had the connection is gone: so is the host side of it.
    (c,) = old
    assert c.recv(10) == b""
    restored = snapshot.restore(tmp_path / "snap")
    with restored.machine as m2:

        def host():
            c2, _ = connect_guest(path, 5000)
            echo_through(c2, 100_000)
            c2.shutdown(socket.SHUT_WR)
            assert c2.recv(10) == b""

        r2 = run_with_host(m2, host)
        out = r2.output.decode()
        assert r2.exit_code == 0, out + r2.message
        assert "connection reset by a restore; listening again" in out
        assert "all checks passed" in out
        st = m2.virtio.stats()[0]
        assert st["transport_resets"] == 1 and st["cid"] == 5

"""kvmpy serve over plain HTTP on its Unix socket: Firecracker's getting-started sequence,
errors, multi-VM mode, supervision, the TCP listener's token, the config file, the console,
migration and scheduler weights (docs/api.md)."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from .api_harness import Daemon, check_ticks, ticker_image


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def multi(tmp_path):
    d = Daemon(tmp_path, "--multi")
    yield d
    d.stop()


def configure_ticker(d: Daemon, base: str = "", mem: int = 16) -> None:
    d.ok("PUT", f"{base}/machine-config", {"vcpu_count": 1, "mem_size_mib": mem, "irqchip": True})
    d.ok("PUT", f"{base}/boot-source", {"kernel_image_path": ticker_image()})


# --- Firecracker's getting started -------------------------------------------------------------


@pytest.mark.kvm
def test_getting_started_sequence(tmp_path):
    """The request sequence of Firecracker's getting-started guide and snapshot guide (logger,
    boot source, root drive, machine, InstanceStart; pause, snapshot; load in a new daemon
    with resume_vm), as curl sends it, with the SDK ticker as the kernel (seconds, where Linux
    takes a minute). tests/test_api_linux.py runs it with Linux, a TAP in a network namespace
    of its own, vsock and the balloon; here no network interface, so that no TAP is made in
    the host's namespace."""
    (tmp_path / "rootfs.ext4").write_bytes(b"\0" * (1 << 20))
    d = Daemon(tmp_path, name="first")
    try:
        assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o600
        assert d.http("GET", "/")[1]["state"] == "Not started"
        d.ok("PUT", "/logger", {"log_path": "./firecracker.log", "level": "Debug",
                                "show_level": True, "show_log_origin": True})  # fmt: skip
        d.ok("PUT", "/boot-source", {"kernel_image_path": ticker_image()})
        d.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "./rootfs.ext4",
                                       "is_root_device": True, "is_read_only": False})  # fmt: skip
        d.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 16, "irqchip": True})
        d.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert d.http("GET", "/")[1]["state"] == "Running"
        d.wait_output("", "tick 3 ")
        config = d.ok("GET", "/vm/config")
        assert config["drives"][0]["drive_id"] == "rootfs"
        assert config["machine-config"]["mem_size_mib"] == 16
        d.ok("PATCH", "/vm", {"state": "Paused"})
        assert d.http("GET", "/")[1]["state"] == "Paused"
        before = d.ok("GET", "/vm/stats")["output_bytes"]
        d.ok("PUT", "/snapshot/create", {"snapshot_type": "Full",
                                         "snapshot_path": "./snapshot_file",
                                         "mem_file_path": "./mem_file"})  # fmt: skip
        time.sleep(0.3)
        assert d.ok("GET", "/vm/stats")["output_bytes"] == before  # paused: nothing printed
        _, last = check_ticks(d.ok("GET", "/console/tail?bytes=262144")["data"])
        assert os.path.samefile(tmp_path / "mem_file", tmp_path / "snapshot_file" / "memory")
        log = (tmp_path / "firecracker.log").read_text()
        assert "[anonymous-instance:MainThread] INFO" in log and "ready (boot)" in log
    finally:
        d.stop()
    d2 = Daemon(tmp_path, name="second")
    try:
        d2.ok("PUT", "/snapshot/load", {"snapshot_path": "./snapshot_file",
                                        "mem_backend": {"backend_path": "./mem_file",
                                                        "backend_type": "File"},
                                        "enable_diff_snapshots": False, "resume_vm": True})  # fmt: skip
        assert d2.http("GET", "/")[1]["state"] == "Running"
        text = d2.wait_output("", f"tick {last + 3} ")
        check_ticks(text, first=last + 1)  # goes on exactly where the snapshot was taken
        assert d2.ok("GET", "/vm/config")["drives"][0]["drive_id"] == "rootfs"
        d2.ok("PUT", "/actions", {"action_type": "Stop"})
        assert d2.wait_state("", "Stopped")["stop"]["stop_reason"] == "interrupted"
    finally:
        d2.stop()


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_one_line_400s(daemon, tmp_path):
    cases = [
        ("PUT", "/machine-config", b"{not json", "not valid JSON"),
        ("PUT", "/machine-config", b"", "needs a JSON body"),
        ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 16, "x": 1}', "unknown field 'x'"),
        ("PUT", "/machine-config", b'{"vcpu_count": "1", "mem_size_mib": 16}', "vcpu_count"),
        ("PUT", "/machine-config", b'{"vcpu_count": 0, "mem_size_mib": 16}', "vcpu_count"),
        ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 16, "smt": true}', "smt"),
        ("PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 16, "huge_pages": "2M"}', "huge pages"),
        ("PUT", "/boot-source", b'{"kernel_image_path": "/nonexistent"}', "No such file"),
        ("PUT", "/drives/a", b'{"drive_id": "b", "is_root_device": false, "path_on_host": "x"}', "differ"),
        ("PUT", "/drives/a", b'{"drive_id": "a", "is_root_device": false, "socket": "/s"}', "vhost-user"),
        ("PUT", "/actions", b'{"action_type": "InstanceStart"}', "boot source"),
        ("PUT", "/actions", b'{"action_type": "Reboot"}', "action_type"),
        ("PATCH", "/vm", b'{"state": "Paused"}', "not started"),
        ("PUT", "/snapshot/create", b'{"snapshot_path": "s", "mem_file_path": "m"}', "not started"),
        ("PUT", "/snapshot/load", b'{"snapshot_path": "s"}', "exactly one"),
        ("GET", "/nowhere", None, "Invalid request method and/or path"),
        ("DELETE", "/machine-config", None, "Invalid request method and/or path"),
        ("PUT", "/entropy", b'{"rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}', "operations"),
    ]  # fmt: skip
    for method, path, raw, words in cases:
        status, doc = daemon.http(method, path, raw=raw)
        assert status == 400, (method, path, status, doc)
        assert set(doc) == {"fault_message"} and "\n" not in doc["fault_message"]
        assert words in doc["fault_message"], (path, doc)
    # A refused request changed nothing.
    assert daemon.ok("GET", "/machine-config") == {"vcpu_count": 1, "mem_size_mib": 128,
                                                   "smt": False, "track_dirty_pages": False}  # fmt: skip
    # curl -d without a content type still means JSON (Firecracker reads bodies as JSON).
    status, _ = daemon.http("PUT", "/machine-config", raw=b'{"vcpu_count": 2, "mem_size_mib": 64}',
                            headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 204 and daemon.ok("GET", "/machine-config")["vcpu_count"] == 2


def test_paths_confined_to_root(tmp_path):
    root = tmp_path / "jail"
    root.mkdir()
    (root / "disk.img").write_bytes(b"\0" * 4096)
    d = Daemon(tmp_path, "--root", str(root))
    try:
        d.ok("PUT", "/drives/d", {"drive_id": "d", "is_root_device": False,
                                   "path_on_host": "/disk.img"})  # fmt: skip
        assert d.ok("GET", "/vm/config")["drives"][0]["path_on_host"] == "/disk.img"
        status, doc = d.http("PUT", "/drives/e", {"drive_id": "e", "is_root_device": False,
                                                   "path_on_host": "../../etc/passwd"})  # fmt: skip
        assert status == 400 and "outside the daemon's root" in doc["fault_message"]
    finally:
        d.stop()


# --- multi mode and supervision ------------------------------------------------------------------


@pytest.mark.kvm
def test_multi_vms_and_a_crash(multi):
    d = multi
    assert d.http("GET", "/vms/a/vm/stats")[0] == 404
    for vm in ("a", "b"):
        d.ok("PUT", f"/vms/{vm}")
        configure_ticker(d, f"/vms/{vm}")
        d.ok("PUT", f"/vms/{vm}/actions", {"action_type": "InstanceStart"})
    assert d.http("PUT", "/vms/a")[0] == 400  # exists already
    assert d.http("GET", "/machine-config")[0] == 400  # no root VM in multi mode
    d.wait_output("/vms/a", "tick 2 ")
    status, doc = d.http("PUT", "/vms/a/actions", {"action_type": "SendCtrlAltDel"})
    assert status == 400 and "no i8042" in doc["fault_message"]
    pid_a = d.ok("GET", "/vms/a/vm/stats")["pid"]
    d.ok("GET", "/vms/b/vm/stats")
    os.kill(pid_a, signal.SIGKILL)  # the VMM of a dies
    st = d.wait_state("/vms/a", "Crashed")
    assert "SIGKILL" in st["crash"]
    status, doc = d.http("PATCH", "/vms/a/vm", {"state": "Paused"})
    assert status == 400 and "crashed" in doc["fault_message"]
    # b did not notice; a's configuration and output are still there, and it boots again.
    assert d.ok("GET", "/vms/b/vm/stats")["state"] == "Running"
    assert d.ok("GET", "/vms/a/vm/config")["machine-config"]["mem_size_mib"] == 16
    assert "tick 2 " in d.ok("GET", "/vms/a/console/tail")["data"]
    d.ok("PUT", "/vms/a/actions", {"action_type": "InstanceStart"})
    d.wait_output("/vms/a", "tick 1 ")
    listed = {v["id"]: v for v in d.ok("GET", "/vms")["vms"]}
    assert listed["a"]["state"] == "Running" and listed["b"]["base"] == "/vms/b"
    d.ok("DELETE", "/vms/b")
    assert "b" not in {v["id"] for v in d.ok("GET", "/vms")["vms"]}


@pytest.mark.kvm
def test_start_failure_keeps_the_vm(daemon, tmp_path):
    """A start that fails (the image is gone by then) is a 400; the VM stays as it was."""
    img = tmp_path / "t.elf"
    img.write_bytes(Path(ticker_image()).read_bytes())
    daemon.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 16, "irqchip": True})
    daemon.ok("PUT", "/boot-source", {"kernel_image_path": str(img)})
    img.write_bytes(b"garbage")
    status, doc = daemon.http("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "kernel_image_path" in doc["fault_message"]
    assert daemon.http("GET", "/")[1]["state"] == "Not started"
    img.write_bytes(Path(ticker_image()).read_bytes())
    daemon.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    daemon.wait_output("", "tick 1 ")
    status, doc = daemon.http("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    assert status == 400 and "pre-boot" in doc["fault_message"]


# --- TCP, token, dashboard page ----------------------------------------------------------------


def test_tcp_listener_wants_the_token(tmp_path):
    import httpx

    (tmp_path / "token").write_text("s3cret-token-0123456789\n")
    d = Daemon(tmp_path, "--http", "127.0.0.1:0", "--token-file", str(tmp_path / "token"))
    try:
        url = _http_url(d)
        assert httpx.get(url + "/version").status_code == 401
        r = httpx.get(url + "/version", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})
        assert r.status_code == 401 and "token" in r.json()["fault_message"]
        auth = {"Authorization": "Bearer s3cret-token-0123456789"}
        assert httpx.get(url + "/version", headers=auth).json()["firecracker_version"]
        page = httpx.get(url + "/?access_token=s3cret-token-0123456789",
                         headers={"Accept": "text/html"})  # fmt: skip
        assert page.status_code == 200 and "<html" in page.text.lower()
        # The Unix socket needs no token.
        assert d.http("GET", "/version")[0] == 200
    finally:
        d.stop()


def _http_url(d: Daemon) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in d.stderr().splitlines():
            if "http://" in line:
                return line.split("http://", 1)[1].split("/", 1)[0].join(["http://", ""])
        time.sleep(0.05)
    raise AssertionError(f"no URL announced: {d.stderr()}")


# --- config file, console, migration, weights ----------------------------------------------------


@pytest.mark.kvm
def test_config_file(tmp_path):
    cfg = {"boot-source": {"kernel_image_path": ticker_image()},
           "machine-config": {"vcpu_count": 1, "mem_size_mib": 16, "irqchip": True},
           "drives": [], "network-interfaces": []}  # fmt: skip
    (tmp_path / "vm.json").write_text(json.dumps(cfg))
    d = Daemon(tmp_path, "--config-file", str(tmp_path / "vm.json"))
    try:
        assert d.http("GET", "/")[1]["state"] == "Running"
        d.wait_output("", "tick 1 ")
    finally:
        d.stop()
    bad = {**cfg, "mmds-config": {"network_interfaces": []}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvmpy", "serve", "--api-sock",
                        str(tmp_path / "b.sock"), "--config-file", str(tmp_path / "bad.json")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "mmds" in r.stderr


@pytest.mark.kvm
def test_console_websocket_input(daemon):
    """The virtio-console example echoes (upper-cased) a line typed into the console
    WebSocket, then exits: the socket closes with the VM."""
    from kvmpy.client import Client
    from kvmpy.sdk.examples import find_example

    daemon.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 16,
                                         "console": "virtio"})  # fmt: skip
    daemon.ok("PUT", "/boot-source",
              {"kernel_image_path": str(find_example("virtio-console").build())})  # fmt: skip
    daemon.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    with Client(daemon.sock) as c, c.vm().console() as con:
        seen = b""
        chunks = iter(con)
        while b"type a line" not in seen:
            seen += next(chunks)
        con.send(b"hello over a websocket\n")
        seen += b"".join(chunks)  # until the VM has exited and the socket closed
    assert b"echo: HELLO OVER A WEBSOCKET" in seen
    assert daemon.wait_state("", "Stopped")["stop"]["exit_code"] == 0


@pytest.mark.kvm
def test_live_migration_between_vms(multi):
    d = multi
    d.ok("PUT", "/vms/src")
    configure_ticker(d, "/vms/src")
    d.ok("PUT", "/vms/src/actions", {"action_type": "InstanceStart"})
    d.ok("PUT", "/vms/dst")
    addr = d.ok("PUT", "/vms/dst/migrate-receive", {"listen": "127.0.0.1:0"})["address"]
    assert d.ok("GET", "/vms/dst/vm/stats")["listening"] == addr
    d.wait_output("/vms/src", "tick 3 ")
    result = d.ok("PUT", "/vms/src/migrate", {"destination": addr})
    assert result["downtime_ms"] > 0 and result["rounds"] >= 1
    d.wait_state("/vms/src", "Migrated")
    src_text = d.ok("GET", "/vms/src/console/tail?bytes=262144")["data"]
    _, last = check_ticks(src_text)
    text = d.wait_output("/vms/dst", f"tick {last + 2} ")
    check_ticks(text, first=last + 1)
    assert d.ok("GET", "/vms/dst/vm/config")["machine-config"]["irqchip"] is True


@pytest.mark.kvm
def test_scheduler_weights(tmp_path):
    """Two CPU-bound VMs on one host CPU, weights 300 and 100: the first gets about three
    times the CPU time of the second."""
    d = Daemon(tmp_path, "--multi", preexec=lambda: os.sched_setaffinity(0, {0}))
    try:
        from kvmpy.sdk.examples import find_example

        spin = str(find_example("spin").build())
        for vm, w in (("heavy", 300), ("light", 100)):
            d.ok("PUT", f"/vms/{vm}")
            d.ok("PUT", f"/vms/{vm}/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
            d.ok("PUT", f"/vms/{vm}/boot-source", {"kernel_image_path": spin})
            d.ok("PUT", f"/vms/{vm}/scheduler", {"weight": w})
        for vm in ("heavy", "light"):
            d.ok("PUT", f"/vms/{vm}/actions", {"action_type": "InstanceStart"})
        assert d.ok("GET", "/vms/heavy/scheduler") == {"weight": 300}
        t0 = {
            vm: sum(d.ok("GET", f"/vms/{vm}/vm/stats")["vcpu_time_s"]) for vm in ("heavy", "light")
        }
        time.sleep(3.0)
        t1 = {
            vm: sum(d.ok("GET", f"/vms/{vm}/vm/stats")["vcpu_time_s"]) for vm in ("heavy", "light")
        }
        ratio = (t1["heavy"] - t0["heavy"]) / max(1e-6, t1["light"] - t0["light"])
        assert 2.0 < ratio < 4.5, ratio
    finally:
        d.stop()

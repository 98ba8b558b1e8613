"""A hostile peer and a careless user against the control channel and live migration
(issue 8): client timeouts, stray and silent connections, the authentication handshake
(wrong key, no key, a replayed handshake), and SIGINT/SIGTERM handled alike."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvmpy.machine import MachineConfig
from kvmpy.persist import migration as M
from kvmpy.persist import state
from kvmpy.persist.errors import MigrationError

KVMPY = [sys.executable, "-m", "kvmpy"]
KEY = b"k" * 32


def kvmpy(*args, timeout=60, **kw):
    return subprocess.run([*KVMPY, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)  # fmt: skip


# --- kvmpy ctl against a VMM that accepts but never answers --------------------------------------


@contextlib.contextmanager
def silent_server(path):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])  # read nothing, answer nothing

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


@pytest.mark.parametrize("op", ["stats", "pause", "snapshot"])
def test_ctl_times_out_and_names_the_operation(tmp_path, op):
    path = tmp_path / "vm.sock"
    extra = [str(tmp_path / "snap")] if op == "snapshot" else []
    with silent_server(path):
        t0 = time.monotonic()
        r = kvmpy("ctl", path, op, *extra, "--timeout", "0.5")
        took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"kvmpy: error: {op}: no answer from") and "0.5 s" in r.stderr
    assert r.stderr.count("\n") == 1 and took < 10


def test_ctl_has_a_default_timeout(tmp_path):
    path = tmp_path / "vm.sock"
    with silent_server(path):
        t0 = time.monotonic()
        r = kvmpy("ctl", path, "stats")
        took = time.monotonic() - t0
    assert r.returncode == 1 and "stats: no answer" in r.stderr and "within 5 s" in r.stderr
    assert took < 20


def test_ctl_migrate_checks_the_address_before_connecting(tmp_path):
    r = kvmpy("ctl", tmp_path / "nothing-here.sock", "migrate", "nohostport")
    assert r.returncode == 2, r.stderr
    assert "not an address: 'nohostport'" in r.stderr and "cannot reach" not in r.stderr


# --- the destination: stray and silent connections -----------------------------------------------


def _hello() -> dict:
    from kvmpy.vmm.config import VmConfig

    cfg = VmConfig(MachineConfig(mode="long-user", memory="2M")).validated().to_dict()
    return {"protocol": M.PROTOCOL, "version": M.VERSION, "state_version": state.STATE_VERSION,
            "config": cfg, "memory": 2 << 20, "page_size": 4096}  # fmt: skip


def _receive_in_thread(incoming):
    out = {}

    def body():
        try:
            out["machine"] = incoming.receive()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def _connect(incoming):
    s = socket.create_connection(incoming.address[:2], timeout=10)
    link = M.Link(s, timeout=10)
    return link


@pytest.mark.kvm
def test_a_stray_connection_is_ignored_and_a_silent_source_times_out():
    incoming = M.Incoming("127.0.0.1", 0, io_timeout=0.5)
    t, out = _receive_in_thread(incoming)
    try:
        # Not a migration: an HTTP client. Dropped; the destination keeps listening.
        with socket.create_connection(incoming.address[:2], timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
        deadline = time.monotonic() + 10
        while incoming.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert incoming.dropped == 1 and t.is_alive()
        # A real source that goes silent after HELLO.
        link = _connect(incoming)
        M._client_handshake(link, None)
        link.send_json(M.HELLO, _hello())
        assert link.recv_header()[0] == M.READY
        t0 = time.monotonic()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert isinstance(out.get("error"), MigrationError)
        assert "timed out" in str(out["error"]) and "nothing runs here" in str(out["error"])
        link.close()
    finally:
        incoming.close()


# --- authentication ------------------------------------------------------------------------------


def test_no_key_is_refused_off_loopback():
    with pytest.raises(MigrationError, match="not a loopback address, without a migration key"):
        M.Incoming("0.0.0.0", 0)
    M.Incoming("0.0.0.0", 0, key=KEY).close()  # with a key it may


def test_keys_come_from_a_file_or_the_environment(tmp_path):
    (tmp_path / "k").write_bytes(KEY + b"\n")
    assert M.load_key(str(tmp_path / "k")) == KEY
    assert M.load_key(None, {M.KEY_ENV: "e" * 20}) == b"e" * 20
    assert M.load_key(None, {}) is None
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(MigrationError, match="at least 16"):
        M.load_key(str(tmp_path / "short"))


def _handshake_pair(dest_key, source_key):
    """One handshake over a socketpair: returns (destination's error, source's error)."""
    a, b = socket.socketpair()
    errors = {}

    def dest():
        try:
            M._server_handshake(M.Link(a, timeout=5), dest_key)
        except Exception as e:  # noqa: BLE001
            errors["dest"] = e

    t = threading.Thread(target=dest)
    t.start()
    try:
        link = M.Link(b, timeout=5)
        M._client_handshake(link, source_key)
        if source_key is None:
            link.send_json(M.HELLO, {})
    except Exception as e:  # noqa: BLE001
        errors["source"] = e
    t.join(10)
    a.close()
    b.close()
    return errors.get("dest"), errors.get("source")


def test_matching_keys_authenticate_both_ways():
    assert _handshake_pair(KEY, KEY) == (None, None)
    assert _handshake_pair(None, None) == (None, None)  # loopback without keys


def test_a_wrong_key_is_refused_with_a_clear_error():
    dest_err, src_err = _handshake_pair(KEY, b"w" * 32)
    assert isinstance(dest_err, M._NotAMigration) and "wrong migration key" in str(dest_err)
    assert isinstance(src_err, MigrationError) and "refused: wrong migration key" in str(src_err)


def test_no_key_on_either_side_is_refused():
    _, src_err = _handshake_pair(KEY, None)
    assert "requires a migration key" in str(src_err)
    _, src_err = _handshake_pair(None, KEY)
    assert "does not authenticate" in str(src_err)


def test_a_replayed_handshake_is_refused():
    # Record what a real source sends on one connection...
    a, b = socket.socketpair()
    recorded = bytearray()
    t = threading.Thread(target=lambda: M._server_handshake(M.Link(a, timeout=5), KEY))
    t.start()
    link = M.Link(b, timeout=5)
    real_send = link.sock.sendmsg

    def recording(bufs, *args):
        for x in bufs:
            recorded.extend(bytes(x))
        return real_send(bufs, *args)

    class Recorder:  # the socket, with what is sent recorded
        sendmsg = staticmethod(recording)

        def __getattr__(self, name):
            return getattr(b, name)

    link.sock = Recorder()
    M._client_handshake(link, KEY)
    t.join(10)
    a.close()
    b.close()
    # ...and replay it on a new one: the destination's nonce differs, so the MAC does not fit.
    a, b = socket.socketpair()
    result = {}

    def dest():
        try:
            M._server_handshake(M.Link(a, timeout=5), KEY)
            result["ok"] = True
        except M._NotAMigration as e:
            result["refused"] = str(e)

    t = threading.Thread(target=dest)
    t.start()
    b.recv(65536)  # the new challenge, ignored by the attacker
    b.sendall(bytes(recorded))
    t.join(10)
    a.close()
    b.close()
    assert result == {"refused": "a wrong migration key"}


# --- signals --------------------------------------------------------------------------------------


def test_migrate_receive_started_from_a_script_stops_on_sigint(tmp_path):
    # `kvmpy migrate-receive &` in a non-interactive shell inherits SIGINT ignored.
    script = f"{' '.join(KVMPY)} migrate-receive --listen 127.0.0.1:0 >/dev/null 2>{tmp_path}/err & echo $!"
    pid = int(subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                             timeout=30).stdout)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "waiting" not in (tmp_path / "err").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("migrate-receive ignored SIGINT")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "interrupted (SIGINT, Ctrl-C); nothing runs here" in (tmp_path / "err").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_migrate_receive_reports_the_signal(sig):
    p = subprocess.Popen([*KVMPY, "migrate-receive", "--listen", "127.0.0.1:0"],
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "waiting" in p.stderr.readline()
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig
    assert err.strip() == "" or "Traceback" not in err
    assert f"{signal.Signals(sig).name}" in err or "Ctrl-C" in err


@pytest.mark.kvm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_the_same_way_on_sigint_and_sigterm(sig, tmp_path, gcc_available):
    sock = tmp_path / "vm.sock"
    p = subprocess.Popen([*KVMPY, "run", "neo", "--control", str(sock), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert err.strip().splitlines() == [
        f"kvmpy: guest stopped: interrupted: interrupted ({name}"
        + (", Ctrl-C)" if sig == signal.SIGINT else ")")
    ]
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["stop_reason"] == "interrupted" and doc["signal"] == name
    assert doc["exit_code"] is None
    assert not sock.exists()  # the control socket is gone


def _port(line: str) -> int:
    return int(re.search(r":(\d+)", line).group(1))


def test_a_non_ascii_mac_is_refused_not_a_traceback():
    # Found by the migration harness: hmac.compare_digest raised TypeError on a str with
    # non-ASCII characters, which a stranger controls.
    a, b = socket.socketpair()
    result = {}

    def dest():
        try:
            M._server_handshake(M.Link(a, timeout=5), KEY)
        except M._NotAMigration as e:
            result["refused"] = str(e)

    t = threading.Thread(target=dest)
    t.start()
    b.recv(65536)
    payload = json.dumps({"nonce": "00" * 32, "mac": "\u00e9" * 64}).encode()
    b.sendall(M.HDR.pack(M.AUTH, len(payload)) + payload)
    t.join(10)
    a.close()
    b.close()
    assert result == {"refused": "a malformed authentication"}


def test_a_destination_that_never_opens_the_handshake_is_given_up_on(monkeypatch):
    # An older kvmpy, or any service that waits for its client to speak first.
    monkeypatch.setattr(M, "HANDSHAKE_TIMEOUT_S", 0.3)
    a, b = socket.socketpair()
    try:
        with pytest.raises(MigrationError, match="did not open the handshake within 0.3 s"):
            M._client_handshake(M.Link(b, timeout=60), None)
    finally:
        a.close()
        b.close()

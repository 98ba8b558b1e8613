"""Snapshot, restore (eager and lazy), the control channel and live migration, end to end.

The check throughout is the hashchain guest's output: it prints a long deterministic sequence
that depends on its registers, an SSE register, its memory and its exit count, so output before
a snapshot (or migration) plus output after it must equal an uninterrupted run, byte for byte.
Restores and migrations run in separate `kvmpy` processes, as a user would run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import control, snapshot, state
from kvmpy.persist.errors import ControlError, SnapshotError
from kvmpy.persist.guest import HashchainParams, write_image
from kvmpy.persist.session import VmSession, helper_thread
from kvmpy.result import Stop, StopReason

pytestmark = pytest.mark.kvm

KVMPY = [sys.executable, "-m", "kvmpy"]
# Short runs for the equality checks (~0.1 s of guest time) and longer ones (~1 s) for the
# tests that need a VM to still be running when a command arrives.
SHORT = HashchainParams(work_bytes=1 << 20, lines=60, rounds_per_line=20_000, memsum_every=7)
LONG = HashchainParams(work_bytes=2 << 20, lines=300, rounds_per_line=60_000, memsum_every=25)
# For the failed migrations: still running after the failure, whatever the machine's load.
LONGER = HashchainParams(work_bytes=2 << 20, lines=300, rounds_per_line=200_000, memsum_every=25)


@pytest.fixture(scope="module")
def images(tmp_path_factory, gcc_available):
    d = tmp_path_factory.mktemp("hashchain")
    return {
        name: write_image(d / f"{name}.elf", params)
        for name, params in (("short", SHORT), ("long", LONG), ("longer", LONGER))
    }


@pytest.fixture(scope="module")
def reference(images):
    """The uninterrupted output of each image."""
    out = {}
    for name, path in images.items():
        with Machine(MachineConfig(mode="long-user", memory="16M")) as m:
            m.load_file(path)
            result = m.run(timeout=60)
        assert result.stop_reason is StopReason.EXIT and result.exit_code == 0
        out[name] = result.output
    assert out["short"].count(b"\n") == 1 + 60 + 60 // 7 + 1
    return out


def kvmpy(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*KVMPY, *map(str, args)], capture_output=True, timeout=timeout, **kw)


def split_json(stdout: bytes) -> tuple[bytes, dict]:
    """Guest output and the final JSON object of a --json run."""
    i = stdout.rindex(b"\n{") + 1 if b"\n{" in stdout else 0
    return stdout[:i], json.loads(stdout[i:])


def snapshot_at(image: Path, path: Path, *, lines=None, later=None, irqchip=False) -> bytes:
    """Run `image` and snapshot it to `path` after `lines` output lines (at an exit), soon
    after `later` lines (wherever the guest is then), or before its first instruction;
    returns the output written before the snapshot."""
    with Machine(MachineConfig(mode="long-user", memory="16M", irqchip=irqchip)) as m:
        m.load_file(image)
        if lines is None and later is None:
            snapshot.take(m, path)
            return b""
        if lines is not None:
            from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str

            def counting(ctx, *args):
                r = hc_print_str(ctx, *args)
                if m.output.count(b"\n") == lines:
                    m.pause_from_guest()
                return r

            m.hypercalls.register(HC_PRINT_STR, counting, "print_str", replace=True)

        def pause() -> None:
            if lines is not None:
                m.wait_paused(60)
            else:
                # Pause from outside once `later` lines are out: the guest is then somewhere
                # in the computation between two lines (not at an exit).
                while m.output.count(b"\n") < later:
                    time.sleep(0.0005)
                m.pause()

        result = run_and_take(m, pause, lambda: snapshot.take(m, path))
        assert result.message == "snapshot taken", result.message
        return result.output


def run_and_take(m: Machine, pause, take, timeout: float = 60.0):
    """Run `m`; in another thread, `pause()` it, `take()` (a snapshot), and end the run."""
    errors = []

    def controller() -> None:
        try:
            pause()
            take()
            m.end_run(Stop(StopReason.INTERRUPTED, 0, "snapshot taken"))
        except BaseException as e:  # reported by the test thread
            errors.append(e)
            m.request_stop(StopReason.VMM_ERROR, f"controller failed: {e}")
        finally:
            try:
                m.resume()
            except Exception:
                pass

    t = threading.Thread(target=controller, daemon=True)
    t.start()
    result = m.run(timeout=timeout)
    t.join(10)
    if errors:
        raise errors[0]
    return result


# --- state, in one process ---------------------------------------------------------------------


@pytest.mark.parametrize("irqchip", [False, True])
def test_state_round_trip_in_process(images, reference, irqchip):
    cfg = MachineConfig(mode="long-user", memory="16M", irqchip=irqchip)
    with Machine(cfg) as a:
        a.load_file(images["short"])
        saved = {}

        def grab():
            saved["state"] = json.loads(json.dumps(state.capture(a)))
            saved["memory"] = a.memory.read(0, 16 << 20)

        def pause():
            while a.output.count(b"\n") < 3:  # mid-run, wherever the guest is
                time.sleep(0.0005)
            a.pause()

        before = run_and_take(a, pause, grab).output
    with Machine(cfg) as b:
        b.memory.write(0, saved["memory"])
        state.apply(b, saved["state"])
        after = b.run(timeout=60)
    assert after.stop_reason is StopReason.EXIT
    assert before + after.output == reference["short"]
    vcpu = saved["state"]["vcpus"][0]
    assert {"regs", "sregs", "fpu", "xsave", "xcrs", "msrs", "vcpu_events", "mp_state"} <= set(vcpu)
    assert ("lapic" in vcpu) is irqchip and ("irqchip" in saved["state"]["vm"]) is irqchip


def test_state_of_another_shape_is_refused(images):
    with Machine(MachineConfig(mode="long-user", memory="16M")) as a:
        a.load_file(images["short"])
        good = state.capture(a)
        for damage, message in [
            (lambda s: s.update(version=9), "state is version 9"),
            (lambda s: s["vcpus"][0].update(regs="AAAA"), "registers is 3 bytes"),
            (lambda s: s["vcpus"][0].update(sregs="!!"), "not valid base64"),
            (lambda s: s["vcpus"][0]["msrs"].append([1]), "MSR list is malformed"),
            (lambda s: s["vmm"]["stats"][0].update(counts=[1]), "wrong length"),
            (lambda s: s["vmm"]["stats"].append({}), "do not match its vCPU count"),
            (lambda s: s["vmm"]["smp"].update(parked=[]), r"SMP state \(parked\)"),
            (lambda s: s["vmm"]["devices"].update({"pio:0x3f8:uart": {}}), "lacks: pio:0x3f8"),
            (lambda s: s["vmm"]["layout"].update(extra=1), "unexpected fields"),
            (lambda s: s.pop("vmm"), "no VMM state"),
        ]:
            bad = json.loads(json.dumps(good))
            damage(bad)
            with (
                Machine(MachineConfig(mode="long-user", memory="16M")) as b,
                pytest.raises(SnapshotError, match=message),
            ):
                state.apply(b, bad)


# --- snapshot and restore in a new process -----------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_restore_continues_exactly_at_several_points(images, reference, tmp_path, lazy):
    points = [
        {},  # before the first instruction
        {"lines": 1},  # at the first hypercall exit
        {"lines": 33},  # at an exit, mid-run
        {"later": 45},  # wherever the guest was computing
    ]
    for i, point in enumerate(points):
        path = tmp_path / f"snap{i}"
        before = snapshot_at(images["short"], path, **point)
        proc = kvmpy("restore", path, "--json", *(["--lazy"] if lazy else []))
        assert proc.returncode == 0, proc.stderr.decode()
        after, doc = split_json(proc.stdout)
        assert before + after == reference["short"], point
        r = doc["restore"]
        assert doc["stop_reason"] == "exit" and r["lazy"] is lazy
        assert r["pages_total"] == 4096 and 0 < r["pages_in_snapshot"] < 4096
        assert r["restore_to_first_instruction_ms"] > 0
        if lazy:  # the handler's background pass may have brought pages in before a fault
            assert 0 <= r["pages_faulted"] <= r["pages_loaded"] <= r["pages_total"]
        else:
            assert r["pages_faulted"] == 0 and r["pages_loaded"] == r["pages_in_snapshot"]


def test_restore_with_irqchip(images, reference, tmp_path):
    before = snapshot_at(images["short"], tmp_path / "s", lines=20, irqchip=True)
    proc = kvmpy("restore", tmp_path / "s", "--lazy")
    assert proc.returncode == 0, proc.stderr.decode()
    assert before + proc.stdout == reference["short"]


@pytest.mark.timeout(120)
def test_lazy_restore_serves_the_vmm_too(images, reference, tmp_path):
    """The VMM's own reads of guest memory (with the GIL held) are served by the handler
    process; a handler thread would deadlock on the first one."""
    before = snapshot_at(images["short"], tmp_path / "s", lines=10)
    r = snapshot.restore(tmp_path / "s", lazy_memory=True, lazy_background=False)
    try:
        m = r.machine
        assert r.loader.stats()["pages_faulted"] == 0
        untouched = m.memory.read(8 << 20, 64)  # a page the snapshot does not hold: zero
        code = m.memory.read(0x100000, 4096)  # the image: served from the snapshot
        assert untouched == bytes(64) and any(code)
        assert r.loader.stats()["pages_faulted"] == 2
        r.mark_first_run()
        result = m.run(timeout=60)
        assert before + result.output == reference["short"]
        rep = r.report()
        assert rep["pages_copied"] <= rep["pages_in_snapshot"] and rep["pages_zeroed"] >= 1
        assert (
            rep["pages_faulted"] <= rep["pages_loaded"] == rep["pages_copied"] + rep["pages_zeroed"]
        )
    finally:
        r.close()


def test_snapshot_of_a_lazily_restored_vm(images, reference, tmp_path):
    before = snapshot_at(images["short"], tmp_path / "a", lines=5)
    r = snapshot.restore(tmp_path / "a", lazy_memory=True)
    try:
        m = r.machine
        from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str

        def counting(ctx, *args):
            ret = hc_print_str(ctx, *args)
            if m.output.count(b"\n") == 10:
                m.pause_from_guest()
            return ret

        m.hypercalls.register(HC_PRINT_STR, counting, "print_str", replace=True)

        def take():
            info = snapshot.take(m, tmp_path / "b")
            assert r.loader.stats()["populated_all"]
            assert info["pages_written"] >= r.info["pages_in_snapshot"] - 2

        middle = run_and_take(m, lambda: m.wait_paused(60), take).output
    finally:
        r.close()
    proc = kvmpy("restore", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr.decode()
    assert before + middle + proc.stdout == reference["short"]


def _corrupt_first_extent(path: Path) -> None:
    from kvmpy.persist import format

    with format.open_snapshot(path) as snap:
        e = snap.extents[0]
    with open(path / "memory", "r+b") as f:
        f.seek(e.offset + 7)
        byte = f.read(1)
        f.seek(e.offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_memory_is_refused_eagerly_and_stops_a_lazy_vm(images, tmp_path):
    snapshot_at(images["short"], tmp_path / "s", lines=3)
    _corrupt_first_extent(tmp_path / "s")
    proc = kvmpy("restore", tmp_path / "s")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("kvmpy: error:") and err.count("\n") == 1, err
    assert "do not match their checksum" in err
    # Lazily: the VM stops, with the same one line and status.
    lazy = kvmpy("restore", tmp_path / "s", "--lazy", "--json")
    assert lazy.returncode == 1, lazy.stderr.decode()
    assert lazy.stderr.decode() == err


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda p: (p / "state.json").write_bytes((p / "state.json").read_bytes()[:100]),
            "truncated",
        ),
        (lambda p: os.truncate(p / "memory", 4096), "memory is truncated"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
        (
            lambda p: (p / "manifest.json").write_text(
                (p / "manifest.json").read_text().replace('"version": 1', '"version": 7')
            ),
            "format version 7",
        ),
    ],
)
def test_damaged_snapshot_gives_one_error_line(images, tmp_path, damage, message):
    snapshot_at(images["short"], tmp_path / "s")
    damage(tmp_path / "s")
    for extra in ([], ["--lazy"]):
        proc = kvmpy("restore", tmp_path / "s", *extra)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and proc.stdout == b""
        assert err.startswith("kvmpy: error:") and err.count("\n") == 1 and message in err, err


# --- the control channel -----------------------------------------------------------------------


@contextlib.contextmanager
def running(image: Path, sock: Path, *extra):
    """`kvmpy run IMAGE --control SOCK` in the background; yields the process once the socket
    answers."""
    proc = subprocess.Popen(
        [*KVMPY, "run", str(image), "--control", str(sock), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                control.request(sock, "stats", timeout=5)
                break
            except ControlError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"the VM did not come up: {proc.stderr.read()!r}"
                    ) from None
                time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def raw_exchange(sock: Path, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_control_channel_rejects_malformed_commands(images, reference, tmp_path):
    sock = tmp_path / "vm.sock"
    with running(images["longer"], sock) as proc:
        bad = [
            b"not json",
            b"[]",
            b'{"op": "explode"}',
            b'{"op": "snapshot"}',
            b'{"op": "snapshot", "path": ["x"]}',
            b'{"op": "pause", "force": 1}',
            b"\x00\x01\x02\xff",
            b'{"op": "migrate", "address": "nowhere"}',
        ]
        replies = raw_exchange(sock, b"\n".join(bad) + b"\n")
        assert len(replies) == len(bad)
        assert all(r["ok"] is False and r["error"] for r in replies), replies
        # An endless line is cut off, not buffered.
        assert raw_exchange(sock, b"x" * (200 * 1024))[-1]["error"] == "request line too long"
        # A snapshot to somewhere that is not a snapshot is refused, the VM untouched.
        (tmp_path / "keep").mkdir()
        (tmp_path / "keep" / "f").write_text("x")
        with pytest.raises(ControlError, match="not a kvmpy snapshot"):
            control.request(sock, "snapshot", {"path": str(tmp_path / "keep")})
        # The good commands still work on the same channel, and the VM was never disturbed.
        good = raw_exchange(sock, b'{"op": "pause"}\n{"op": "stats"}\n{"op": "resume"}\n')
        assert [r["ok"] for r in good] == [True, True, True]
        assert good[1]["result"]["state"] == "paused"
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert out == reference["longer"]
    assert not sock.exists()


def test_ctl_pause_stats_snapshot_resume(images, reference, tmp_path):
    sock, snap = tmp_path / "vm.sock", tmp_path / "snap"
    with running(images["longer"], sock) as proc:
        assert kvmpy("ctl", sock, "pause").stdout == b"paused\n"
        stats = json.loads(kvmpy("ctl", sock, "stats", "--json").stdout)
        assert stats["state"] == "paused" and stats["mode"] == "long-user"
        time.sleep(0.1)
        again = json.loads(kvmpy("ctl", sock, "stats", "--json").stdout)
        assert again["exits"]["total"] == stats["exits"]["total"]  # really paused
        # A relative path is the ctl user's, not the VMM's (which runs elsewhere).
        taken = kvmpy("ctl", sock, "snapshot", snap.name, "--json", cwd=tmp_path)
        assert taken.returncode == 0, taken.stderr.decode()
        info = json.loads(taken.stdout)
        assert json.loads(kvmpy("ctl", sock, "stats", "--json").stdout)["state"] == "paused"
        assert kvmpy("ctl", sock, "resume").stdout == b"running\n"
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == reference["longer"]
    restored = kvmpy("restore", snap)
    assert restored.returncode == 0
    assert out[: info["output_bytes"]] + restored.stdout == reference["longer"]
    gone = kvmpy("ctl", sock, "stats")
    assert gone.returncode == 1 and b"no VM serves it" in gone.stderr


def test_session_api(images):
    with Machine(MachineConfig(mode="long-user", memory="16M")) as m:
        m.load_file(images["long"])
        s = VmSession(m)
        with pytest.raises(ControlError, match="not started"):
            s.pause()
        seen = {}

        def drive():
            s.wait_started()
            s.pause()
            seen["paused"] = s.status()["state"]
            seen["exits"] = m.vcpus[0].stats.total
            seen["job"] = s.call_paused(lambda: m.vcpus[0].fd.get_regs().rip)
            s.resume()
            control.stop(s)

        helper_thread(drive, name="drive")
        result = s.run(timeout=60)
    assert seen["paused"] == "paused" and seen["job"] > 0
    assert result.stop_reason is StopReason.INTERRUPTED
    with pytest.raises(ControlError, match="has stopped"):
        s.resume()


# --- live migration ----------------------------------------------------------------------------


@contextlib.contextmanager
def receiver(*extra):
    proc = subprocess.Popen(
        [*KVMPY, "migrate-receive", "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stderr.readline().decode()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_migration_between_two_processes(images, reference, tmp_path):
    sock = tmp_path / "vm.sock"
    with receiver("--json") as (dst, port), running(images["longer"], sock, "--json") as src:
        time.sleep(0.3)
        mig = kvmpy("ctl", sock, "migrate", f"127.0.0.1:{port}", "--json")
        assert mig.returncode == 0, mig.stderr.decode()
        src_out, src_err = src.communicate(timeout=60)
        dst_out, dst_err = dst.communicate(timeout=60)
    assert src.returncode == 0 and dst.returncode == 0, (src_err, dst_err)
    before, src_doc = split_json(src_out)
    after, dst_doc = split_json(dst_out)
    assert before + after == reference["longer"]
    assert 0 < len(before) < len(reference["longer"])  # it really moved mid-run
    assert src_doc["stop_reason"] == "migrated" and dst_doc["stop_reason"] == "exit"
    assert b"the VM runs there now" in src_err
    for doc in (json.loads(mig.stdout), src_doc["migration"], dst_doc["migration"]):
        assert {"total_s", "downtime_ms", "rounds", "pages_per_round"} <= set(doc)
        assert doc["rounds"] == len(doc["pages_per_round"]) >= 2
        assert doc["downtime_ms"] > 0 and doc["total_s"] > 0
    assert src_doc["migration"]["pages_per_round"] == dst_doc["migration"]["pages_per_round"]
    assert src_doc["migration"]["downtime_ms"] == pytest.approx(dst_doc["migration"]["downtime_ms"])


class Proxy:
    """A TCP relay that drops both connections after `limit` bytes from the source."""

    def __init__(self, port: int, limit: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.limit = port, limit
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(b, a, 1 << 62), daemon=True).start()
        self._pump(a, b, self.limit)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @staticmethod
    def _pump(src, dst, limit):
        moved = 0
        with contextlib.suppress(OSError):
            while moved < limit and (data := src.recv(min(65536, limit - moved))):
                dst.sendall(data)
                moved += len(data)


@pytest.mark.parametrize("limit", [100, 1 << 20])
def test_dropped_link_leaves_the_source_running(images, reference, tmp_path, limit):
    """The link dies during the HELLO exchange or in the middle of the memory rounds."""
    sock = tmp_path / "vm.sock"
    with receiver() as (dst, port), running(images["longer"], sock) as src:
        proxy = Proxy(port, limit)
        mig = kvmpy("ctl", sock, "migrate", f"127.0.0.1:{proxy.port}")
        err = mig.stderr.decode()
        assert mig.returncode == 1 and "the VM keeps running here" in err, err
        assert json.loads(kvmpy("ctl", sock, "stats", "--json").stdout)["state"] == "running"
        src_out, src_err = src.communicate(timeout=60)
        dst_out, dst_err = dst.communicate(timeout=60)
    assert src.returncode == 0 and src_out == reference["longer"]
    assert b"keeps running here" in src_err
    assert dst.returncode == 1 and dst_out == b""
    assert b"nothing runs here" in dst_err


def test_migration_to_nobody(images, reference, tmp_path):
    sock = tmp_path / "vm.sock"
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # bound, closed right after: refuses connections
    with running(images["longer"], sock) as src:
        mig = kvmpy("ctl", sock, "migrate", f"127.0.0.1:{port}")
        assert mig.returncode == 1 and b"cannot connect" in mig.stderr
        assert json.loads(kvmpy("ctl", sock, "stats", "--json").stdout)["state"] == "running"
        out, _ = src.communicate(timeout=60)
    assert src.returncode == 0 and out == reference["longer"]


def test_a_lazily_restored_vm_can_be_migrated(images, reference, tmp_path):
    """The migration first brings in every page the lazy restore has not served yet (they are
    holes in the memfd, invisible to a memory scan), then moves the VM as usual."""
    before = snapshot_at(images["longer"], tmp_path / "s", lines=10)
    sock = tmp_path / "vm.sock"
    with receiver() as (dst, port):
        src = subprocess.Popen(
            [*KVMPY, "restore", str(tmp_path / "s"), "--lazy", "--control", str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while kvmpy("ctl", sock, "stats").returncode != 0:
                assert src.poll() is None and time.monotonic() < deadline, src.stderr.read()
            mig = kvmpy("ctl", sock, "migrate", f"127.0.0.1:{port}", "--json")
            assert mig.returncode == 0, mig.stderr.decode()
            middle, src_err = src.communicate(timeout=60)
        finally:
            if src.poll() is None:
                src.kill()
        after, dst_err = dst.communicate(timeout=60)
    assert src.returncode == 0 and dst.returncode == 0, (src_err, dst_err)
    assert before + middle + after == reference["longer"]
    assert middle and after  # it ran in both places


def test_lazy_restore_serves_kvms_own_accesses(tmp_path, gcc_available):
    """A ring-0 guest: on a host that emulates ring 0 (KVM-PVM) every instruction is fetched
    and decoded by KVM's emulator from guest memory, so the faults are KVM's, not the guest's;
    on VT-x/AMD-V KVM still walks the page tables the guest's first fetch needs."""
    from kvmpy.arch.x86.modes import Mode
    from kvmpy.sdk.examples import find_example

    image = find_example("hello").build(Mode.LONG)
    with Machine(MachineConfig(mode="long", memory="16M")) as m:
        m.load_file(image)
        snapshot.take(m, tmp_path / "s")
        expected = m.run(timeout=60).output
    # Without the background pass, so that every page comes in through a fault.
    r = snapshot.restore(tmp_path / "s", lazy_memory=True, lazy_background=False)
    try:
        r.mark_first_run()
        result = r.machine.run(timeout=60)
        faulted = r.loader.stats()["pages_faulted"]
    finally:
        r.close()
    assert result.output == expected and b"long mode" in result.output
    assert faulted >= 3  # code, stack and page tables at least


def test_a_destination_that_refuses_leaves_the_source_running(images, reference, tmp_path):
    """A destination that answers HELLO with an error (as a kvmpy that cannot build the
    machine does): the error reaches the user, the VM goes on at the source."""
    from kvmpy.persist import migration

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def refuse():
        conn, _ = listener.accept()
        link = migration.Link(conn)
        link.send_json(migration.CHALLENGE, {"protocol": migration.PROTOCOL,
                                             "version": migration.VERSION, "auth": False})  # fmt: skip
        link.expect(migration.HELLO)
        link.send_json(migration.ERROR, {"error": "no room for a 16 MiB guest here"})
        link.close()

    threading.Thread(target=refuse, daemon=True).start()
    sock = tmp_path / "vm.sock"
    with running(images["longer"], sock) as src:
        mig = kvmpy("ctl", sock, "migrate", f"127.0.0.1:{port}")
        err = mig.stderr.decode()
        assert mig.returncode == 1, err
        assert "the destination failed: no room for a 16 MiB guest here" in err
        assert "the VM keeps running here" in err
        out, _ = src.communicate(timeout=60)
    listener.close()
    assert src.returncode == 0 and out == reference["longer"]


def test_one_migration_at_a_time(images):
    from kvmpy.persist.errors import MigrationError

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = threading.Event()
    release = threading.Event()

    def stall():  # accepts, never answers HELLO until released, then hangs up
        conn, _ = listener.accept()
        accepted.set()
        release.wait(30)
        conn.close()

    threading.Thread(target=stall, daemon=True).start()
    outcome = {}
    with Machine(MachineConfig(mode="long-user", memory="16M")) as m:
        m.load_file(images["longer"])
        s = VmSession(m)

        def first():
            try:
                control.migrate(s, f"127.0.0.1:{port}")
            except MigrationError as e:
                outcome["first"] = str(e)

        def second():
            s.wait_started()
            assert accepted.wait(30)
            try:
                control.migrate(s, f"127.0.0.1:{port}")
            except ControlError as e:
                outcome["second"] = str(e)
            release.set()
            t.join(30)
            control.stop(s)

        t = helper_thread(lambda: (s.wait_started(), first()), name="first")
        helper_thread(second, name="second")
        result = s.run(timeout=60)
    listener.close()
    assert outcome["second"] == "a migration is under way; try again when it is over"
    assert "the VM keeps running here" in outcome["first"]
    assert result.stop_reason is StopReason.INTERRUPTED  # stopped by us, not migrated


def test_device_states_travel_with_the_snapshot(images, tmp_path):
    from kvmpy.devices import Device

    class Counter(Device):
        name = "counter"

        def __init__(self):
            self.count = 0

        def state(self):
            return {"count": self.count}

        def restore_state(self, state):
            self.count = int(state["count"])

    with Machine(MachineConfig(mode="long-user", memory="16M")) as m:
        pio, mmio = Counter(), Counter()
        m.add_pio_device(0x600, 2, pio)
        m.add_mmio_device(0xD000_0000, 0x1000, mmio)
        m.load_file(images["short"])
        pio.count, mmio.count = 5, 7
        snapshot.take(m, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "state.json").read_text())["vmm"]["devices"]
    assert saved["pio:0x600:counter"] == {"count": 5}
    assert saved["mmio:0xd0000000:counter"] == {"count": 7}
    assert saved["pio:0xe9:debugcon"] == {"bytes_written": 0}
    fresh = {}

    def setup(machine):
        fresh["pio"], fresh["mmio"] = Counter(), Counter()
        machine.add_pio_device(0x600, 2, fresh["pio"])
        machine.add_mmio_device(0xD000_0000, 0x1000, fresh["mmio"])

    r = snapshot.restore(tmp_path / "s", setup=setup)
    r.close()
    assert (fresh["pio"].count, fresh["mmio"].count) == (5, 7)
    with pytest.raises(SnapshotError, match="lacks: mmio:0xd0000000:counter, pio:0x600:counter"):
        snapshot.restore(tmp_path / "s")


# --- SMP machines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smp_chain(gcc_available):
    from kvmpy.sdk.examples import find_example

    image = find_example("smp-chain").build()
    ref = {}
    for n in (2, 4):
        with Machine(MachineConfig(mode="long-user", memory="64M", vcpus=n)) as m:
            m.load_file(image)
            result = m.run(timeout=120)
        assert result.stop_reason is StopReason.EXIT, result.message
        ref[n] = result.output
    assert ref[2] != ref[4]
    return image, ref


@pytest.mark.parametrize("vcpus", [2, 4])
@pytest.mark.parametrize("where", ["line", "mid-step"])
def test_smp_snapshot_restores_every_vcpu(smp_chain, tmp_path, vcpus, where):
    """At a line (the secondaries parked) or mid-step (every vCPU computing, wherever it is):
    a restore in a new process continues with output identical to an uninterrupted run."""
    image, ref = smp_chain
    with Machine(MachineConfig(mode="long-user", memory="64M", vcpus=vcpus)) as m:
        m.load_file(image)
        if where == "line":
            from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str

            def counting(ctx, *args):
                r = hc_print_str(ctx, *args)
                if m.output.count(b"\n") == 40:
                    m.pause_from_guest()
                return r

            m.hypercalls.register(HC_PRINT_STR, counting, "print_str", replace=True)
            pause = lambda: m.wait_paused(60)  # noqa: E731
        else:

            def pause():
                while m.output.count(b"\n") < 60:
                    time.sleep(0.0005)
                time.sleep(0.002)
                m.pause()

        before = run_and_take(m, pause, lambda: snapshot.take(m, tmp_path / "snap")).output
    proc = kvmpy("restore", tmp_path / "snap", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    after, doc = split_json(proc.stdout)
    assert before + after == ref[vcpus]
    assert len(doc["vcpus"]) == vcpus


def test_smp_migration_between_two_processes(smp_chain, tmp_path):
    image, ref = smp_chain
    sock = tmp_path / "vm.sock"
    with (
        receiver("--json") as (dst, port),
        running(image, sock, "--json", "--vcpus", "4") as src,
    ):
        while control.request(sock, "stats", timeout=5)["output_bytes"] < 2000:
            time.sleep(0.01)
        # Through the library, not `kvmpy ctl`: a new interpreter can take a second to start
        # on a busy machine, and the guest runs for a few seconds only.
        mig = control.request(sock, "migrate", {"address": f"127.0.0.1:{port}"}, timeout=60)
        assert mig["downtime_ms"] > 0
        src_out, src_err = src.communicate(timeout=120)
        dst_out, dst_err = dst.communicate(timeout=120)
    assert src.returncode == 0 and dst.returncode == 0, (src_err, dst_err)
    before, src_doc = split_json(src_out)
    after, dst_doc = split_json(dst_out)
    assert 0 < len(before) < len(ref[4])
    assert before + after == ref[4]
    assert src_doc["stop_reason"] == "migrated" and dst_doc["stop_reason"] == "exit"
    assert len(dst_doc["vcpus"]) == 4

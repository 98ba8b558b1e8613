"""Linux end to end, through `kvmpy` processes as a user runs them (issue 10, and the Linux part
of issue 11). A boot takes tens of seconds on our software-KVM hosts (minutes under load), so
the kernel boots ONCE per test session and every check below shares that boot:

* the machine: `kvmpy boot --dump-config` (2 vCPUs, a virtio-mmio disk with an ext4 image made
  on the host, an entropy device, a virtio console, --append), run by `kvmpy run --config` with
  the shell on the serial console and stdin piped in: /init reached, --json milestones,
  commands typed and answered, `nproc` = 2, the date from the RTC, /proc/cmdline, the disk
  mounted and written, /dev/hwrng, output through /dev/hvc0; then a snapshot, and a live
  migration to a `kvmpy migrate-receive` whose shell answers and then panics (guest_panic);
* the snapshot restored in a new process: its shell answers, writes to the disk, powers off
  (exit status 0), and the host finds both files in the image; restored once more: `reboot`;
* bad input: one clear line each (no boot).

The minimal microVM kernel is the one booted; `make test` builds it first (once, cached under
~/.cache/kvmpy; the fixture builds it too when pytest runs alone).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .linux_guest import READY, GuestProcess, ext4_cat, make_ext4

#: A cold kernel build (minutes) runs inside the first test's setup, then one boot.
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(3600)]

#: Generous: a boot on a loaded 2-core machine has taken several minutes.
BOOT_TIMEOUT = 1200.0
RUN_TIMEOUT = "3000"


@pytest.fixture(scope="session")
def kernel() -> str:
    from kvmpy.boot.kernels import ensure_microvm

    return str(ensure_microvm().vmlinux)


def kvmpy(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def _ctl(sock: Path, *args, timeout=600):
    r = kvmpy("ctl", str(sock), *args, "--timeout", "300", timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


@pytest.fixture(scope="session")
def scenario(kernel, tmp_path_factory):
    """The one boot, its snapshot restored (twice), its migration: everything the tests below
    look at."""
    tmp = tmp_path_factory.mktemp("linux")
    disk = tmp / "disk.img"
    make_ext4(disk, {"hello.txt": "hello from the host\n"})
    sock = tmp / "ctl.sock"
    snap = tmp / "snap"
    res: dict = {"disk": disk}
    procs: list[GuestProcess] = []
    try:
        r = kvmpy("boot", kernel, "--vcpus", "2", "--disk", str(disk), "--rng", "--console",
                  "virtio", "--append", "kvmpy.test=yes", "--dump-config")  # fmt: skip
        assert r.returncode == 0, r.stderr
        config = json.loads(r.stdout)
        # Keep the virtio console (hvc0) but the shell on ttyS0: the serial input path.
        config["boot"]["cmdline"] = "kvmpy.test=yes"
        cfg = tmp / "linux.json"
        cfg.write_text(json.dumps(config))
        res["config"] = config
        t0 = time.monotonic()
        a = GuestProcess(["run", "--config", str(cfg), "--control", str(sock), "--json",
                          "--timeout", RUN_TIMEOUT])  # fmt: skip
        procs.append(a)
        # Typed at once, as `printf ... | kvmpy boot` does: held until the guest listens.
        a.type("echo early-$((5*5))")
        a.wait_for(READY, BOOT_TIMEOUT)
        res["ready_s"] = time.monotonic() - t0
        res["early"] = a.wait_for(b"early-25", 300) > 0
        a.sh("dmesg -n 1")  # kernel messages (ext4's) off the console the answers come on
        res["nproc"] = a.sh("nproc")
        res["guest_time"] = a.sh("date +%s")
        res["host_time"] = time.time()
        res["cmdline"] = a.sh("cat /proc/cmdline")
        res["tty"] = a.sh("tty")
        res["mount"] = a.sh(
            "mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt && echo from-guest > "
            "/mnt/guest.txt && umount /mnt && echo unmounted"
        )
        res["hwrng"] = a.sh("head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'")
        res["rng_current"] = a.sh("cat /sys/class/misc/hw_random/rng_current")
        # The virtio console's output reaches the same stdout; the guest computes the text, so
        # the echo of the typed command cannot match.
        a.sh("echo hvc0-$((300+33)) > /dev/hvc0")
        res["hvc0_out"] = bytes(a.out)
        # A snapshot of the running guest (the shell idle at its prompt).
        _ctl(sock, "snapshot", str(snap))
        res["after_snapshot"] = a.sh("echo still-$((20+1))")
        # Live migration to a new process on this host.
        dest = GuestProcess(["migrate-receive", "--listen", "127.0.0.1:0", "--json",
                             "--timeout", RUN_TIMEOUT])  # fmt: skip
        procs.append(dest)
        port = _wait_port(dest)
        _ctl(sock, "migrate", f"127.0.0.1:{port}")
        res["source_rc"], res["source_doc"] = a.finish(120)
        res["migrated"] = dest.sh("echo migrated-$((40+2))")
        res["migrated_nproc"] = dest.sh("nproc")
        dest.type("echo c > /proc/sysrq-trigger")
        res["panic_rc"], res["panic_doc"] = dest.finish(600)
        res["panic_stderr"] = dest.stderr
        # The snapshot, restored in a new process.
        r = GuestProcess(["restore", str(snap), "--json", "--timeout", RUN_TIMEOUT])
        procs.append(r)
        res["restored"] = r.sh("echo restored-$((6*7))")
        res["restored_after"] = r.sh("echo still-$((20+1))")
        res["restored_mount"] = r.sh(
            "mount -t ext4 /dev/vda /mnt && echo from-restore > /mnt/restore.txt && "
            "umount /mnt && echo unmounted"
        )
        r.type("poweroff -f")
        res["poweroff_rc"], res["poweroff_doc"] = r.finish(600)
        res["poweroff_stderr"] = r.stderr
        # Once more (no new boot): reboot.
        r2 = GuestProcess(["restore", str(snap), "--json", "--timeout", RUN_TIMEOUT])
        procs.append(r2)
        res["restored2"] = r2.sh("echo again-$((3*3))")
        r2.type("reboot -f")
        res["reboot_rc"], res["reboot_doc"] = r2.finish(600)
        yield res
    finally:
        for p in procs:
            p.kill()


def _wait_port(dest: GuestProcess) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"waiting for a migration on [\d.]+:(\d+)", dest.stderr)
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError(f"migrate-receive did not start: {dest.stderr}")


# --- the boot -----------------------------------------------------------------------------------


def test_boot_reaches_init_and_reports_milestones(scenario):
    doc = scenario["source_doc"]
    linux = doc["linux"]
    ms = linux["milestones_s"]
    assert 0 < ms["first_line"] < ms["run_init"] < ms["init_marker"]
    assert set(linux["milestones_cpu_s"]) >= {"first_line", "run_init", "init_marker"}


def test_commands_through_the_console(scenario):
    assert scenario["early"]  # typed before the guest listened, answered by its shell
    assert scenario["tty"] == "/dev/ttyS0"  # the serial console's shell
    assert scenario["after_snapshot"] == "still-21"


def test_hvc0_output_reaches_the_host(scenario):
    assert b"hvc0-333" in scenario["hvc0_out"]


def test_nproc_is_vcpus(scenario):
    assert scenario["nproc"] == "2"


def test_rtc_date_is_the_hosts(scenario):
    # No network and no RTC class interface in the guest: its clock came from the CMOS RTC,
    # which reads the host's time.
    assert abs(int(scenario["guest_time"]) - scenario["host_time"]) < 120


def test_cmdline_carries_append(scenario):
    line = scenario["cmdline"]
    assert line.endswith("kvmpy.test=yes")
    assert "virtio_mmio.device=4K@0x" in line  # kvmpy announced the mmio devices


def test_ext4_from_the_host_on_vda(scenario):
    assert scenario["mount"].splitlines() == ["hello from the host", "unmounted"]


def test_hwrng(scenario):
    assert re.fullmatch(r"[0-9a-f]{64}", scenario["hwrng"]), scenario["hwrng"]
    assert scenario["rng_current"].startswith("virtio_rng")


def test_software_host_profile_counted(scenario):
    doc = scenario["source_doc"]
    sw = doc["linux"]["software_host"]
    fallbacks = doc["stats"].get("fallbacks", {})
    if sw:
        assert fallbacks.get("lstar_write", 0) >= 2  # one per CPU
        assert fallbacks.get("syscall_trap_installed") == 1
        assert "noxsave" in doc["linux"]["cmdline"]
    else:
        assert fallbacks == {} and "noxsave" not in doc["linux"]["cmdline"]


# --- migration, panic ---------------------------------------------------------------------------


def test_live_migration_shell_answers(scenario):
    assert scenario["source_rc"] == 0
    assert scenario["source_doc"]["stop_reason"] == "migrated"
    assert scenario["migrated"] == "migrated-42"
    assert scenario["migrated_nproc"] == "2"


def test_panic_is_guest_panic(scenario):
    assert scenario["panic_rc"] == 125, scenario["panic_stderr"]
    doc = scenario["panic_doc"]
    assert doc["stop_reason"] == "guest_panic"
    assert "Kernel panic - not syncing: sysrq triggered crash" in doc["message"]
    err = scenario["panic_stderr"]
    assert "guest stopped: guest_panic: Kernel panic" in err and "last console lines" in err


# --- restore, poweroff, the disk on the host --------------------------------------------------


def test_restored_snapshot_shell_answers(scenario):
    assert scenario["restored"] == "restored-42"
    assert scenario["restored_after"] == "still-21"


def test_poweroff_is_status_0(scenario):
    assert scenario["poweroff_rc"] == 0, scenario["poweroff_stderr"]
    assert scenario["poweroff_doc"]["stop_reason"] == "poweroff"


def test_reboot_ends_the_vm(scenario):
    assert scenario["restored2"] == "again-9"
    assert scenario["reboot_rc"] == 0
    assert scenario["reboot_doc"]["stop_reason"] == "reboot"


def test_host_sees_what_the_guests_wrote(scenario):
    assert scenario["restored_mount"] == "unmounted"
    disk = scenario["disk"]
    assert ext4_cat(disk, "guest.txt") == "from-guest\n"
    assert ext4_cat(disk, "restore.txt") == "from-restore\n"
    r = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- bad input --------------------------------------------------------------------------------


def _one_line_error(r, text: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    # The software-host notice may come first (docs/linux.md); then the one error line.
    lines = [x for x in r.stderr.splitlines() if not x.startswith("kvmpy: WARNING")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kvmpy: error:") and text in lines[0], r.stderr


def test_not_a_kernel(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a kernel\n" * 100)
    _one_line_error(kvmpy("boot", str(f), "--no-initrd"), "is not a Linux kernel")


def test_truncated_bzimage(kernel, tmp_path):
    from kvmpy.boot.kernels import find_kernel

    bz = find_kernel("microvm").bzimage.read_bytes()
    f = tmp_path / "bzImage"
    f.write_bytes(bz[: len(bz) // 3])
    _one_line_error(kvmpy("boot", str(f), "--no-initrd"), "truncated")


def test_initrd_too_large(kernel, tmp_path):
    big = tmp_path / "big.cpio"
    with open(big, "wb") as f:
        f.truncate(96 << 20)
    _one_line_error(kvmpy("boot", kernel, "--initrd", str(big), "--mem", "64M"),
                    "does not fit in guest memory")  # fmt: skip


def test_cmdline_over_the_limit(kernel):
    _one_line_error(kvmpy("boot", kernel, "--no-initrd", "--append", "x" * 4000),
                    "this kernel accepts at most")  # fmt: skip


# --- kvmpy bench boot (the boot itself is measured by hand: docs/linux.md) ---------------------


def test_bench_boot_unknown_kernel(tmp_path):
    _one_line_error(kvmpy("bench", "boot", "--kernel", str(tmp_path / "nope")), "no such kernel")


def test_bench_boot_symbolizes_samples(tmp_path):
    from kvmpy.benchmarks.boot import by_function, symbolize

    smap = tmp_path / "System.map"
    smap.write_text("ffffffff81000000 T _text\nffffffff81000100 T clear_page\n"
                    "ffffffff81000200 t memcpy_erms\nffffffff81000300 D data\n")  # fmt: skip
    samples = [[[0xFFFFFFFF81000108, 0xFFFFFFFF81000210], 3], [[0xFFFFFFFF81000204], 2],
               [[0x401000], 1]]  # fmt: skip
    named = symbolize(samples, smap)
    assert named[0] == [["clear_page+0x8", "memcpy_erms+0x10"], 3]
    assert named[2] == [["0x401000"], 1]  # user space stays an address
    assert by_function(named) == [("clear_page", 3), ("memcpy_erms", 2), ("0x401000", 1)]
    assert by_function(named, depth=1) == [("memcpy_erms", 3)]

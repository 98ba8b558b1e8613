"""KSM: the host settings (sysfs), per-VM sharing, mergeable guest RAM.

The sysfs tests run against a directory laid out like /sys/kernel/mm/ksm, so they change
nothing on the host; the ones that need the real thing (refusal without root, merging two
VMs' pages) save the host's settings and put them back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.ksm import KsmError, sysfs, usage
from kvmpy.ksm.sysfs import Ksm

KVMPY = [sys.executable, "-m", "kvmpy"]
REAL = Path("/sys/kernel/mm/ksm")

DEFAULTS = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "max_page_sharing": "256",
    "merge_across_nodes": "1", "use_zero_pages": "0", "smart_scan": "1",
    "stable_node_chains_prune_millisecs": "2000", "advisor_mode": "[none] scan-time",
    "advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500",
    "advisor_max_pages_to_scan": "30000", "advisor_target_scan_time": "200",
    "pages_shared": "3", "pages_sharing": "10", "pages_unshared": "0", "pages_volatile": "0",
    "pages_scanned": "0", "pages_skipped": "0", "full_scans": "4", "ksm_zero_pages": "0",
    "general_profit": "40000", "stable_node_chains": "0", "stable_node_dups": "0",
}  # fmt: skip


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A directory that looks like /sys/kernel/mm/ksm, made the default root."""
    root = tmp_path / "ksm"
    root.mkdir()
    for name, value in DEFAULTS.items():
        (root / name).write_text(value + "\n")
    monkeypatch.setattr(sysfs, "KSM_DIR", root)
    return root


def values(root: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in root.iterdir()}


def test_status_reads_settings_and_counters(fake):
    st = Ksm().status()
    assert st["state"] == "stopped"
    assert st["settings"]["pages_to_scan"] == 100 and st["settings"]["advisor_mode"] == "none"
    assert st["counters"]["pages_sharing"] == 10 and st["saved_bytes"] == 10 * 4096


def test_no_ksm_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sysfs, "KSM_DIR", tmp_path / "none")
    with pytest.raises(KsmError, match="no same-page merging.*CONFIG_KSM"):
        Ksm()
    assert main(["ksm", "status"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("kvmpy: error: this kernel has no same-page merging")
        and err.count("\n") == 1
    )


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("pages_to_scan", 0, "between 1 and 1000000"),
        ("pages_to_scan", "12x", "must be an integer"),
        ("pages_to_scan", 10**7, "between 1 and 1000000"),
        ("sleep_millisecs", -1, "between 0 and 60000"),
        ("sleep_millisecs", 60_001, "between 0 and 60000"),
        ("run", 3, "between 0 and 2"),
        ("max_page_sharing", 1, "between 2 and"),
        ("use_zero_pages", 2, "between 0 and 1"),
        ("advisor_mode", "fast", "one of none, scan-time"),
        ("advisor_max_cpu", 101, "between 1 and 100"),
        ("advisor_target_scan_time", 0, "between 1 and 3600"),
        ("pages_to_scan", 1.5, "must be an integer"),
    ],
)
def test_every_value_is_checked_before_anything_is_written(fake, name, value, message):
    before = values(fake)
    # A valid value next to the bad one: it must not be written either.
    other = "pages_to_scan" if name == "sleep_millisecs" else "sleep_millisecs"
    with pytest.raises(KsmError, match=message):
        Ksm().set(**{other: 5, name: value})
    assert values(fake) == before


def test_set_writes_in_order_and_run_last(fake, monkeypatch):
    order = []
    real = Ksm._write

    def spy(self, name, text):
        order.append(name)
        real(self, name, text)

    monkeypatch.setattr(Ksm, "_write", spy)
    Ksm().set(run=1, pages_to_scan=2000, sleep_millisecs=10)
    assert order == ["pages_to_scan", "sleep_millisecs", "run"]
    assert values(fake)["pages_to_scan"] == "2000" and values(fake)["run"] == "1"


def test_unknown_and_absent_settings(fake):
    with pytest.raises(KsmError, match="no setting 'pages'"):
        Ksm().set(pages=1)
    (fake / "smart_scan").unlink()  # an older kernel
    with pytest.raises(KsmError, match="has no smart_scan setting"):
        Ksm().set(smart_scan=0)
    assert "smart_scan" not in Ksm().settings()


def test_pages_to_scan_under_the_advisor_is_explained(fake):
    (fake / "advisor_mode").write_text("none [scan-time]\n")
    with pytest.raises(KsmError, match="set by KSM's advisor.*--advisor none"):
        Ksm().set(pages_to_scan=500)
    Ksm().set(advisor_mode="none", pages_to_scan=500)  # both at once: advisor first
    assert values(fake)["pages_to_scan"] == "500"


def test_advisor_bounds_are_checked_together(fake):
    with pytest.raises(KsmError, match="must not be above"):
        Ksm().set(advisor_min_pages_to_scan=40000)


def test_save_and_restore_put_back_only_what_changed(fake):
    ksm = Ksm()
    saved = ksm.save()
    ksm.set(pages_to_scan=4000, sleep_millisecs=0, run=1, use_zero_pages=1)
    (fake / "general_profit").write_text("7\n")  # a counter: not a setting, never written
    assert ksm.restore(saved) == []
    now = values(fake)
    assert now["pages_to_scan"] == "100" and now["sleep_millisecs"] == "20"
    assert now["run"] == "0" and now["use_zero_pages"] == "0" and now["general_profit"] == "7"


def test_restore_reports_what_it_could_not_put_back(fake, monkeypatch):
    ksm = Ksm()
    saved = ksm.save()
    ksm.set(pages_to_scan=4000, run=1)
    real = Ksm._write

    def refuse_pages(self, name, text):
        if name == "pages_to_scan":
            raise KsmError("refused")
        real(self, name, text)

    monkeypatch.setattr(Ksm, "_write", refuse_pages)
    failed = ksm.restore(saved)
    assert len(failed) == 1 and failed[0].startswith("pages_to_scan")
    assert values(fake)["run"] == "0"  # the rest went back all the same


def test_cli_on_off_tune(fake, capsys):
    assert main(["ksm", "on", "--pages-to-scan", "3000", "--sleep", "5"]) == 0
    assert values(fake)["run"] == "1" and values(fake)["pages_to_scan"] == "3000"
    assert "KSM running: pages_to_scan 3000, sleep 5 ms" in capsys.readouterr().out
    assert main(["ksm", "off", "--unmerge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["run"] == 2
    assert main(["ksm", "tune", "--smart-scan", "0", "--max-page-sharing", "512"]) == 0
    assert values(fake)["smart_scan"] == "0" and values(fake)["max_page_sharing"] == "512"
    assert main(["ksm", "tune", "--sleep", "soon"]) == 1
    assert "must be an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ksm", "tune"])
    assert e.value.code == 2


@pytest.mark.skipif(not REAL.is_dir(), reason="this kernel has no KSM")
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_without_root_writes_are_refused_in_one_line_and_status_works():
    before = Ksm().save()
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run([*nobody, *KVMPY, "ksm", "on", "--pages-to-scan", "5000"],
                       capture_output=True, text=True, env=env, cwd="/")  # fmt: skip
    assert p.returncode == 1
    assert p.stderr == (
        "kvmpy: error: changing KSM settings needs root: cannot write "
        "/sys/kernel/mm/ksm/pages_to_scan (permission denied)\n"
    )
    p = subprocess.run([*nobody, *KVMPY, "ksm", "status", "--json"], capture_output=True,
                       text=True, env=env, cwd="/")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["settings"]["pages_to_scan"] == before["pages_to_scan"]
    assert Ksm().save() == before


def test_ksmd_cpu_time_is_read_from_proc():
    if sysfs.ksmd_pid() is None:
        pytest.skip("no ksmd thread on this kernel")
    assert sysfs.ksmd_cpu_seconds() >= 0.0
    assert sysfs.process_cpu_seconds(os.getpid()) > 0.0


# --- per-process and per-mapping usage ------------------------------------------------------------

SMAPS = b"""\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                1024 kB
Pss:                 300 kB
KSM:                 900 kB
Anonymous:          1024 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac mg
7f0000400000-7f0000800000 rw-p 00000000 00:00 0
Rss:                  16 kB
Pss:                  16 kB
KSM:                   0 kB
VmFlags: rd wr mr mw me ac mg
7f0000800000-7f0000801000 rw-p 00000000 00:00 0
Rss:                   4 kB
VmFlags: rd wr mr mw me ac
"""


def test_mappings_sum_the_vmas_inside_the_ranges():
    d = usage.mappings([(0x7F0000000000, 0x7F0000800000)], smaps=SMAPS)
    assert d["vmas"] == 2 and d["mergeable"] is True
    assert d["rss_bytes"] == 1040 * 1024 and d["ksm_bytes"] == 900 * 1024
    assert d["pss_bytes"] == 316 * 1024
    d = usage.mappings([(0x7F0000000000, 0x7F0000801000)], smaps=SMAPS)
    assert d["vmas"] == 3 and d["mergeable"] is False
    assert usage.mappings([(0, 4096)], smaps=SMAPS)["vmas"] == 0


def test_ksm_stat_of_this_process():
    st = usage.ksm_stat()
    if st is None:
        pytest.skip("this kernel has no /proc/PID/ksm_stat")
    assert st["ksm_merging_pages"] >= 0 and isinstance(st["ksm_mergeable"], bool)


# --- mergeable guest RAM (KVM) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hashchain(tmp_path_factory, gcc_available):
    from kvmpy.persist.guest import HashchainParams, write_image

    params = HashchainParams(work_bytes=1 << 20, lines=40, rounds_per_line=20_000, memsum_every=7)
    return write_image(tmp_path_factory.mktemp("ksm") / "hc.elf", params)


@pytest.mark.kvm
def test_mergeable_ram_is_anonymous_and_marked(hashchain):
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.result import StopReason

    with Machine(MachineConfig(mode="long-user", memory="16M", mergeable=True)) as m:
        (region,) = m.memory.regions
        assert region.anonymous and region.mergeable and region.fd == -1
        m.load_file(hashchain)
        assert m.run(timeout=60).stop_reason is StopReason.EXIT
        d = usage.vm_memory(m.memory.regions)
        assert d["vmas"] >= 1 and d["mergeable"] is True
        assert 1 << 20 < d["rss_bytes"] <= 16 << 20
        assert m.vm_config().to_dict()["machine"]["mergeable"] is True
    with Machine(MachineConfig(mode="long-user", memory="16M")) as m:
        assert not m.memory.regions[0].anonymous
        assert usage.vm_memory(m.memory.regions)["mergeable"] is False


@pytest.mark.kvm
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_mergeable_vm_snapshots_and_restores_exactly(hashchain, tmp_path, lazy):
    """Anonymous RAM has no file to ask for its data (SEEK_DATA): the snapshot finds the
    touched pages in /proc/self/pagemap instead."""
    from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.persist import snapshot
    from kvmpy.result import Stop, StopReason

    cfg = MachineConfig(mode="long-user", memory="16M", mergeable=True)
    with Machine(cfg) as m:
        m.load_file(hashchain)
        reference = m.run(timeout=60).output
    with Machine(cfg) as m:
        m.load_file(hashchain)
        info = {}

        def counting(ctx, *args):
            r = hc_print_str(ctx, *args)
            if m.output.count(b"\n") == 20:
                m.pause_from_guest()  # the snapshot is taken outside, once the vCPU is out
            return r

        def controller():
            m.wait_paused(60)
            info.update(snapshot.take(m, tmp_path / "s"))
            m.end_run(Stop(StopReason.INTERRUPTED, 0, "taken"))
            m.resume()

        m.hypercalls.register(HC_PRINT_STR, counting, "print_str", replace=True)
        t = threading.Thread(target=controller, daemon=True)
        t.start()
        before = m.run(timeout=60)
        t.join(10)
    assert before.message == "taken"
    # The work area (1 MiB) and the image are in; the untouched rest of 16 MiB is not.
    assert 256 < info["pages_written"] < 1024
    p = subprocess.run([*KVMPY, "restore", tmp_path / "s", *(["--lazy"] if lazy else [])],
                       capture_output=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()
    assert before.output + p.stdout == reference


@pytest.mark.kvm
@pytest.mark.skipif(not REAL.is_dir() or os.geteuid() != 0, reason="needs KSM and root")
def test_two_vms_share_their_identical_pages_and_ctl_stats_show_it(hashchain, tmp_path):
    """Two VMM processes with the same guest: KSM merges their identical pages (the image,
    the work area the guests fill the same way), and `ctl stats` shows it per VM."""
    from kvmpy.persist.control import request
    from kvmpy.persist.guest import HashchainParams, write_image

    forever = write_image(tmp_path / "idle.elf", HashchainParams(
        work_bytes=2 << 20, lines=0, rounds_per_line=1, memsum_every=0, ticks=(1 << 64) - 1,
        tick_cycles=10_000_000))  # fmt: skip
    ksm = Ksm()
    saved = ksm.save()
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [*KVMPY, "run", forever, "--mergeable", "--mem", "16M", "--control",
                 tmp_path / f"{i}.sock"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
        for i in range(2):
            assert sysfs.wait_for(lambda i=i: (tmp_path / f"{i}.sock").exists(), 30)
        ksm.set(pages_to_scan=2000, sleep_millisecs=10, run=1)

        def merged(i):
            return request(tmp_path / f"{i}.sock", "stats")["ram"]["ksm"]["merging_pages"]

        assert sysfs.wait_for(lambda: min(merged(0), merged(1)) >= 512, 60, 0.2), (
            merged(0), merged(1))  # fmt: skip
        st = request(tmp_path / "0.sock", "stats")
        ram = st["ram"]
        assert st["mergeable"] is True and ram["mergeable"] is True
        assert ram["ksm_bytes"] >= 512 * 4096 and ram["pss_bytes"] < ram["rss_bytes"]
        p = subprocess.run([*KVMPY, "ctl", tmp_path / "1.sock", "stats"], capture_output=True,
                           text=True)  # fmt: skip
        assert "mergeable:" in p.stdout and "merged" in p.stdout, p.stdout
    finally:
        for p in procs:
            p.kill()
            p.wait()
        assert ksm.restore(saved) == []
    assert ksm.save() == saved


@pytest.mark.kvm
@pytest.mark.timeout(180)
def test_a_mergeable_vm_migrates(tmp_path, gcc_available):
    """Live migration reads anonymous RAM through pagemap, and the destination, built from
    the same VmConfig, has mergeable RAM too."""
    import contextlib

    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.persist.guest import HashchainParams, write_image

    from .test_persist import receiver, running, split_json

    image = write_image(tmp_path / "hc.elf", HashchainParams(
        work_bytes=2 << 20, lines=300, rounds_per_line=200_000, memsum_every=25))  # fmt: skip
    with Machine(MachineConfig(mode="long-user", memory="16M", mergeable=True)) as m:
        m.load_file(image)
        reference = m.run(timeout=120).output
    sock = tmp_path / "vm.sock"
    with contextlib.ExitStack() as stack:
        dst, port = stack.enter_context(receiver("--json"))
        src = stack.enter_context(running(image, sock, "--json", "--mergeable", "--mem", "16M"))
        time.sleep(0.3)
        mig = subprocess.run([*KVMPY, "ctl", sock, "migrate", f"127.0.0.1:{port}"],
                             capture_output=True, timeout=120)  # fmt: skip
        assert mig.returncode == 0, mig.stderr.decode()
        src_out, _ = src.communicate(timeout=120)
        dst_out, dst_err = dst.communicate(timeout=120)
    before, _ = split_json(src_out)
    after, doc = split_json(dst_out)
    assert doc["stop_reason"] == "exit", dst_err
    assert before + after == reference and 0 < len(before) < len(reference)


def test_lab_plans_and_vm_count(tmp_path, capsys):
    from kvmpy.ksm.lab import plan

    assert [s.vms for s in plan("default").scenarios] == [8, 8]
    full = plan("full")
    assert {s.vms for s in full.scenarios} == {2, 4, 8, 16}
    assert [s.vms for s in plan("default", vms=4).scenarios] == [4, 4]
    assert plan("quick", runs=2).scenarios[0].runs == 2
    for bad in ("1", "17"):
        assert main(["lab", "ksm", "--vms", bad, "--out", str(tmp_path / "x")]) == 1
        assert "the lab runs 2 to 16 VMs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was made

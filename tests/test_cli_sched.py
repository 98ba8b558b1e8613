"""kvmpy sched through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from kvmpy.cli.sched import VmArg, _vm_arg


def kvmpy(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr
    assert "Traceback" not in r.stdout


@pytest.mark.kvm
def test_sched_json(gcc_available):
    r = kvmpy("sched", "--policy", "weighted", "--vm", "neo:7", "--vm", "morpheus:3",
              "--quantum", "5ms", "--duration", "0.4s", "--json")  # fmt: skip
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["policy"] == "weighted" and doc["quantum_s"] == 0.005
    assert doc["duration_limit_s"] == 0.4 and doc["duration_s"] >= 0.4
    assert [v["name"] for v in doc["vms"]] == ["neo", "morpheus"]
    assert [v["target_share"] for v in doc["vms"]] == [0.7, 0.3]
    for v in doc["vms"]:
        assert {"host_share", "progress_share", "switches"} <= set(v)
        assert v["switches"] > 0 and v["state"] == "running"
    assert doc["switch_cost_us"] > 0 and doc["interrupted"] is False
    assert r.stderr == ""  # no live view, no notes with --json


@pytest.mark.kvm
def test_sched_table_and_plot(gcc_available, tmp_path):
    plot = tmp_path / "shares.png"
    r = kvmpy("sched", "--policy", "timer", "--vm", "spin", "--vm", "neo", "--vm", "spin",
              "--duration", "300ms", "--plot", str(plot))  # fmt: skip
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert "kvmpy sched: timer, quantum 10 ms" in r.stdout
    for name in ("spin ", "neo ", "spin-2 "):
        assert name in r.stdout
    assert "median switch cost" in r.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.kvm
def test_sched_weights_under_an_equal_share_policy_get_a_note(gcc_available):
    r = kvmpy("sched", "--policy", "on-io", "--vm", "io-heavy:3", "--vm", "io-heavy",
              "--duration", "0.1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "note" in r.stderr and "shares the CPU equally" in r.stderr


@pytest.mark.kvm
def test_sched_reports_a_vm_that_faulted(gcc_available):
    r = kvmpy("sched", "--policy", "timer", "--vm", "fault", "--vm", "neo", "--duration", "0.3")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^fault: exception at \d+\.\d\d s: #PF page fault", r.stdout, re.M)
    # Its output is kept and shown, tagged with its name.
    assert "[fault] About to write to 0x7000000000" in r.stdout


@pytest.mark.kvm
def test_sched_ctrl_c_still_prints_the_summary(gcc_available):
    # Build first, so the signal lands in the schedule and not in the compiler.
    assert kvmpy("sched", "--vm", "spin", "--duration", "0.05", "--json").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "sched", "--policy", "on-io", "--vm", "spin",
         "--vm", "neo", "--duration", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["duration_s"] < 60
    assert doc["vms"][0]["host_s"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["sched", "--duration", "1"], "--vm"),
        (["sched", "--vm", "neo:0"], "weights must be positive"),
        (["sched", "--vm", "neo:-2"], "weights must be positive"),
        (["sched", "--vm", "neo:nan"], "weights must be positive"),
        (["sched", "--vm", "neo:heavy"], "not a number"),
        (["sched", "--vm", ":3"], "no image"),
        (["sched", "--vm", "neo", "--quantum", "0"], "quantum must be positive"),
        (["sched", "--vm", "neo", "--quantum", "10us"], "at least 100us"),
        (["sched", "--vm", "neo", "--quantum", "soon"], "not a duration"),
        (["sched", "--vm", "neo", "--duration", "0s"], "duration must be positive"),
        (["sched", "--vm", "neo", "--policy", "lottery"], "invalid choice"),
        (["sched", "--vm", "neo", "--plot", "x.txt"], "must end in"),
        (["sched", "--vm", "neo", "--mem", "lots"], "not a size"),
    ],
)
def test_sched_usage_errors_exit_2(args, message):
    r = kvmpy(*args)
    no_traceback(r)
    assert r.returncode == 2
    assert "usage:" in r.stderr and message in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--vm", "/nonexistent/guest.elf"], "no such file"),
        (["--vm", "no-such-example"], "not the name of a bundled example"),
    ],
)
def test_sched_user_errors_are_one_line(args, message, gcc_available):
    r = kvmpy("sched", *args)
    no_traceback(r)
    assert r.returncode == 1
    assert r.stderr.startswith("kvmpy: error:") and message in r.stderr
    assert r.stderr.count("\n") == 1


def test_vm_argument(tmp_path):
    assert _vm_arg("neo") == VmArg("neo", 1.0)
    assert _vm_arg("neo:7") == VmArg("neo", 7.0)
    assert _vm_arg("dir/guest.elf:0.25") == VmArg("dir/guest.elf", 0.25)
    odd = tmp_path / "odd:name.elf"
    odd.write_bytes(b"")
    assert _vm_arg(str(odd)) == VmArg(str(odd), 1.0)  # an existing file wins over IMAGE:WEIGHT
    assert _vm_arg(f"{odd}:2") == VmArg(str(odd), 2.0)


@pytest.mark.kvm
def test_live_view_draws_every_vm(gcc_available, kvm):
    import io

    from rich.console import Console

    from kvmpy.cli.sched import _LiveView
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.sched import Scheduler
    from kvmpy.sdk.examples import find_example

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with (
        Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as a,
        Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as b,
    ):
        a.load_file(find_example("neo").build())
        b.load_file(find_example("spin").build())
        with _LiveView(console, 0.3) as live:
            Scheduler([a, b], "timer", names=["[bold]neo", "spin"]).run(
                0.3, on_tick=live.update, tick_interval=0.05
            )
    text = out.getvalue()
    assert "timer:" in text and "/ 0.3 s" in text
    assert "[bold]neo" in text and "spin" in text  # names are text, not markup


def test_vm_argument_with_vcpus(tmp_path):
    assert _vm_arg("smp-sum:2:4") == VmArg("smp-sum", 2.0, 4)
    assert _vm_arg("smp-sum::4") == VmArg("smp-sum", 1.0, 4)
    odd = tmp_path / "odd:name.elf"
    odd.write_bytes(b"")
    assert _vm_arg(f"{odd}:2:3") == VmArg(str(odd), 2.0, 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["sched", "--vm", "smp-sum:1:0"], "1 to 16 vCPUs"),
        (["sched", "--vm", "smp-sum:1:17"], "1 to 16 vCPUs"),
        (["sched", "--vm", "smp-sum:1:many"], "not a vCPU count"),
        (["sched", "--vm", "neo", "--vcpus", "0"], "1 to 16 vCPUs"),
        (["sched", "--vm", "neo", "--cpu", "0,0"], "listed twice"),
        (["sched", "--vm", "neo", "--holder-grace", "soon"], "not a duration"),
    ],
)
def test_sched_vcpu_usage_errors_exit_2(args, message):
    r = kvmpy(*args)
    no_traceback(r)
    assert r.returncode == 2
    assert "usage:" in r.stderr and message in r.stderr


@pytest.mark.kvm
def test_sched_smp_vms_json(gcc_available):
    r = kvmpy("sched", "--policy", "weighted", "--vm", "smp-sum:1:2", "--vm", "neo",
              "--vm", "smp-chain", "--vcpus", "3", "--quantum", "1ms", "--duration", "0.5s",
              "--json")  # fmt: skip
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [len(v["vcpus"]) for v in doc["vms"]] == [2, 3, 3]
    assert doc["holder_grace_s"] == 0
    for v in doc["vms"]:
        assert sum(c["cpu_s"] for c in v["vcpus"]) == pytest.approx(v["cpu_s"], abs=1e-5)
        assert {"cpu", "host_share", "slices", "exits", "state"} <= set(v["vcpus"][0])


@pytest.mark.kvm
def test_sched_table_shows_vcpus_and_the_stopping_one(gcc_available):
    r = kvmpy("sched", "--policy", "timer", "--vm", "smp-sum::2", "--quantum", "500us",
              "--duration", "60s")  # fmt: skip
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert "  cpu0" in r.stdout and "  cpu1" in r.stdout
    assert re.search(r"smp-sum: exit on cpu0 at [\d.]+ s", r.stdout)
    assert "[smp-sum] smp-sum: OK" in r.stdout

"""The kvmpy command, through a subprocess as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kvmpy(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr
    assert "Traceback" not in r.stdout


@pytest.mark.kvm
def test_run_hello(gcc_available):
    r = kvmpy("run", "hello")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert "Hello from a kvmpy guest (long-user mode)!" in r.stdout
    assert "IO in: 0\nIO out: 5\n" in r.stdout


@pytest.mark.kvm
def test_run_json_ends_with_one_object(gcc_available):
    r = kvmpy("run", "hello", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["stop_reason"] == "exit"
    assert doc["exit_code"] == 0
    assert doc["exits"] == {"io": 17}
    assert set(doc["regs"]) >= {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rip", "rflags"}
    assert doc["stats"]["by_port"]["0x500"]["out"] == 17
    assert doc["mode"] == "long-user"


@pytest.mark.kvm
def test_run_stats_table(gcc_available):
    r = kvmpy("run", "hello", "--stats")
    assert r.returncode == 0
    assert "VM exits by reason" in r.stderr and "hypercall" in r.stderr
    assert "Hello from" in r.stdout  # the table does not go to stdout


@pytest.mark.kvm
def test_trace_exits(gcc_available):
    r = kvmpy("run", "hello-raw", "--trace-exits")
    assert r.returncode == 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("[exit")]
    assert len(lines) == 19
    assert "out port=0xe9" in lines[0]
    assert "hypercall=exit" in lines[-1]


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["real", "protected", "long", "long-user"])
def test_run_example_in_a_mode(mode, gcc_available):
    r = kvmpy("run", "hello", "--mode", mode)
    assert r.returncode == 0, r.stderr
    assert f"({mode} mode)" in r.stdout


@pytest.mark.kvm
def test_paged32_host_limitation_is_one_sentence(gcc_available, kvm):
    r = kvmpy("run", "hello", "--mode", "paged32")
    no_traceback(r)
    if r.returncode == 0:
        assert "(paged32 mode)" in r.stdout  # a host that runs 32-bit paging
    else:
        assert r.returncode == 125
        assert r.stderr.count("\n") == 1
        assert "cannot run 32-bit paged guests" in r.stderr


@pytest.mark.kvm
def test_guest_fault_is_a_report_not_a_traceback(gcc_available):
    r = kvmpy("run", "fault")
    no_traceback(r)
    assert r.returncode == 125
    assert "guest stopped: exception: #PF page fault in ring 3" in r.stderr
    assert "rip=" in r.stderr and "mov qword ptr [rax], 1" in r.stderr


@pytest.mark.kvm
def test_guest_exit_code_is_the_process_status(tmp_path, gcc_available):
    src = tmp_path / "seven.c"
    src.write_text("#include <kvmpy.h>\nint main(void) { return 7; }\n")
    out = tmp_path / "seven.elf"
    b = kvmpy("build", str(src), "-o", str(out), "--mode", "long")
    assert b.returncode == 0, b.stderr
    r = kvmpy("run", str(out))
    assert r.returncode == 7
    doc = json.loads(kvmpy("run", str(out), "--json").stdout.splitlines()[-1])
    assert doc["mode"] == "long"  # from the ELF's note


@pytest.mark.kvm
def test_timeout(tmp_path, assemble):
    img = tmp_path / "spin.bin"
    img.write_bytes(assemble("1: jmp 1b"))
    r = kvmpy("run", str(img), "--mode", "long-user", "--timeout", "0.5", "--json")
    no_traceback(r)
    assert r.returncode == 124
    assert json.loads(r.stdout.splitlines()[-1])["stop_reason"] == "timeout"


@pytest.mark.kvm
def test_raw_image_with_load_address_and_entry(tmp_path, assemble):
    img = tmp_path / "raw.bin"
    code = assemble("nop\n nop\n mov $9, %edi\n xor %eax, %eax\n mov $0x500, %dx\n out %eax, %dx")
    img.write_bytes(code)
    r = kvmpy("run", str(img), "--mode", "long", "--load-addr", "0x200000", "--entry", "0x200002")
    assert r.returncode == 9, r.stderr


def test_build_errors_are_one_message(tmp_path, gcc_available):
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return nope; }\n")
    r = kvmpy("build", str(bad), "-o", str(tmp_path / "x.elf"))
    no_traceback(r)
    assert r.returncode == 1
    assert "kvmpy: error: compiling bad.c failed" in r.stderr
    assert "nope" in r.stderr
    r = kvmpy("build", str(tmp_path / "missing.c"), "-o", str(tmp_path / "x.elf"))
    assert r.returncode == 1 and "no such source file" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run"],
        ["run", "hello", "--mode", "turbo"],
        ["run", "hello", "--load-addr", "banana"],
        ["run", "hello", "--load-addr", "-5"],
        ["nonsense"],
        ["build", "x.c"],
    ],
)
def test_usage_errors_exit_2(args):
    r = kvmpy(*args)
    assert r.returncode == 2
    assert "usage:" in r.stderr
    no_traceback(r)


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "/nonexistent/guest.bin"], "no such file"),
        (["run", "no-such-example"], "not the name of a bundled example"),
    ],
)
def test_user_errors_are_one_line(args, message, gcc_available):
    r = kvmpy(*args)
    no_traceback(r)
    assert r.returncode == 1
    assert message in r.stderr
    assert r.stderr.startswith("kvmpy: error:")
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "hello", "--mem", "lots"], "not a size"),
        (["run", "hello", "--mem", "100"], "at least 1M"),
        (["run", "hello", "--timeout", "-1"], "finite, positive number of seconds"),
    ],
)
def test_bad_flag_values_are_usage_errors(args, message):
    r = kvmpy(*args)
    no_traceback(r)
    assert r.returncode == 2
    assert message in r.stderr.splitlines()[-1]


def test_bad_images_are_one_line(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    junk_elf = tmp_path / "junk.elf"
    junk_elf.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 9 + b"garbage" * 3)
    for path, message in (
        (empty, "is empty"),
        (junk_elf, "not a valid ELF"),
        (tmp_path, "is a directory"),
    ):
        r = kvmpy("run", str(path), "--mode", "long")
        no_traceback(r)
        assert r.returncode == 1, (path, r.stderr)
        assert message in r.stderr


def test_missing_kvm_says_what_to_do(tmp_path):
    """Without /dev/kvm, kvmpy runs the guest on unicorn and says so in one line; with
    --accel kvm it refuses, saying what to do."""
    env = {"KVMPY_DEV": str(tmp_path / "kvm")}
    r = kvmpy("run", "hello-raw", env=env)
    no_traceback(r)
    assert r.returncode == 0 and r.stdout.startswith("Hello, raw")
    assert r.stderr.count("\n") == 1 and "running on the unicorn backend" in r.stderr
    assert "does not exist" in r.stderr and "modprobe" in r.stderr
    r = kvmpy("run", "hello-raw", "--accel", "kvm", env=env)
    no_traceback(r)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "modprobe" in r.stderr


def test_unusable_kvm_device(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_text("")
    r = kvmpy("run", "hello-raw", "--accel", "kvm", env={"KVMPY_DEV": str(fake)})
    no_traceback(r)
    assert r.returncode == 1
    assert "not a KVM device" in r.stderr
    # Without --accel kvm, the guest runs on unicorn, and the reason is given in one line.
    r = kvmpy("run", "hello-raw", env={"KVMPY_DEV": str(fake)})
    assert r.returncode == 0 and "not a KVM device" in r.stderr and "unicorn" in r.stderr


def test_examples_list():
    r = kvmpy("examples", "--json")
    assert r.returncode == 0
    names = {e["name"]: e for e in json.loads(r.stdout)}
    assert {"hello", "hello-raw", "fault", "abi-check"} <= set(names)
    assert names["hello"]["default_mode"] == "long-user"
    assert "real" in names["hello"]["modes"]
    r = kvmpy("examples")
    assert "hello" in r.stdout


@pytest.mark.kvm
def test_doctor():
    r = kvmpy("doctor", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["kvm_usable"] and rep["api_version"] == 12
    assert rep["capabilities"]["SYNC_REGS"]["value"]
    assert rep["host_kind"] in ("software (KVM-PVM-like)", "hardware (VT-x/AMD-V)")
    assert rep["cpl0_ns_per_insn"] > 0 and rep["cpl3_ns_per_insn"] > 0
    # The Linux software-host profile is reported exactly where it is applied.
    if rep["ring0_emulated"]:
        assert any("noxsave" in item for item in rep["linux_profile"])
        assert "software-host profile" in rep["host_summary"]
    else:
        assert rep["linux_profile"] == []
    assert rep["backends"]["kvm"]["usable"] and rep["backends"]["unicorn"]["usable"]
    assert "irqchip" in rep["backends"]["kvm"]["supports"]
    r = kvmpy("doctor", "--quick")
    assert r.returncode == 0 and "KVM API version 12" in r.stdout


def test_doctor_without_kvm(tmp_path):
    """Without /dev/kvm, kvmpy still runs guests (on unicorn): doctor says both."""
    r = kvmpy("doctor", env={"KVMPY_DEV": str(tmp_path / "kvm")})
    assert r.returncode == 0
    assert "/dev/kvm is not usable" in r.stdout and "unicorn backend here" in r.stdout
    no_traceback(r)
    r = kvmpy("doctor", "--json", env={"KVMPY_DEV": str(tmp_path / "kvm")})
    rep = json.loads(r.stdout)
    assert not rep["kvm_usable"] and not rep["backends"]["kvm"]["usable"]
    uni = rep["backends"]["unicorn"]
    assert uni["usable"] and set(uni["supports"]) == {"msi", "paged32", "userfaultfd"}
    assert {"irqchip", "irqfd", "ioeventfd", "dirty_log", "pit"} <= set(uni["lacks"])


@pytest.mark.kvm
def test_an_inherited_signal_mask_does_not_stop_timeouts(tmp_path):
    """A parent thread that blocks SIGALRM (kvmpy's own helper threads do) passes its mask on to
    the processes it starts; kvmpy unblocks the signals its run loop needs, so --timeout still
    stops a guest that never exits."""
    import signal
    import threading

    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # 1: jmp 1b
    result = {}

    def spawn():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})
        try:
            result["proc"] = subprocess.run(
                [sys.executable, "-m", "kvmpy", "run", str(spin), "--mode", "long-user",
                 "--timeout", "0.2"],
                capture_output=True, timeout=30,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            result["proc"] = e

    t = threading.Thread(target=spawn)
    t.start()
    t.join()
    assert getattr(result["proc"], "returncode", None) == 124, result["proc"]

"""What a careless user does to the kvmpy command (issue 8): odd durations, broken output,
guests whose output ends mid-line, exit statuses. Every case is one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KVMPY = [sys.executable, "-m", "kvmpy"]


def kvmpy(*args, timeout=120, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*KVMPY, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text


def one_error_line(stderr: str) -> str:
    no_traceback(stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e12", "0", "-1", "soon"])
def test_run_timeout_must_be_finite_positive_and_bounded(value):
    r = kvmpy("run", "hello", f"--timeout={value}")
    no_traceback(r.stderr)
    assert r.returncode == 2, r.stderr
    assert "--timeout" in r.stderr and "finite, positive" in r.stderr or "not a number" in r.stderr


@pytest.mark.parametrize("command", [["restore", "snap"], ["migrate-receive", "--listen", ":0"]])
def test_restore_and_migrate_receive_timeouts_too(command, tmp_path):
    r = kvmpy(*command, "--timeout", "inf", cwd=tmp_path)
    no_traceback(r.stderr)
    assert r.returncode == 2 and "finite, positive" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["1e12s", "inf", "nan"])
def test_sched_duration_is_bounded(value):
    r = kvmpy("sched", "--vm", "neo", "--duration", value)
    no_traceback(r.stderr)
    assert r.returncode == 2 and "finite" in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.kvm
def test_machine_run_refuses_an_infinite_timeout(kvm):
    from kvmpy.errors import ConfigError
    from kvmpy.loader import load_raw
    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(b"\xf4"))
        for bad in (float("inf"), float("nan"), 1e12, 0):
            with pytest.raises(ConfigError, match="timeout"):
                m.run(timeout=bad)


# --- output that cannot be written -------------------------------------------------------------


@pytest.mark.kvm
def test_run_into_a_full_device(gcc_available):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*KVMPY, "run", "hello", "--json"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)  # fmt: skip
    line = one_error_line(r.stderr)
    assert line.startswith("kvmpy: error: cannot write the guest's output: No space left")
    assert r.returncode == 74


@pytest.mark.kvm
def test_run_with_stdout_closed(gcc_available):
    r = subprocess.run([*KVMPY, "run", "hello"], stderr=subprocess.PIPE, text=True, timeout=120,
                       preexec_fn=lambda: os.close(1))  # fmt: skip
    line = one_error_line(r.stderr)
    assert "standard output is closed" in line
    assert r.returncode == 74


@pytest.mark.kvm
def test_run_into_a_pipe_closed_early(gcc_available):
    # `kvmpy run hello | head -c 1`, with a reader that is gone before the guest has finished.
    p = subprocess.Popen([*KVMPY, "run", "hello"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(1) == b"H"
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    err = err.decode()
    no_traceback(err)
    if p.returncode != 0:  # the guest may have written everything before the pipe closed
        assert "broken pipe" in one_error_line(err)
        assert p.returncode == 74


# --- --json after output that does not end a line, exit codes ----------------------------------

NO_NEWLINE = r"""
#include <kvmpy.h>
void main(void) { hc_print_str("no newline"); hc_exit(3); }
"""

FOREVER = r"""
#include <kvmpy.h>
void main(void) { hc_print_str("waiting"); for (;;) hc_num_exits(); }
"""


@pytest.mark.kvm
def test_json_starts_on_its_own_line(build_guest):
    r = kvmpy("run", build_guest(NO_NEWLINE), "--json")
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith("no newline\n{"), r.stdout
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["exit_code"] == 3 and doc["stop_reason"] == "exit"


@pytest.mark.kvm
def test_exit_code_is_null_when_the_guest_did_not_exit(build_guest):
    r = kvmpy("run", build_guest(FOREVER), "--json", "--stats", "--timeout", "0.5")
    assert r.returncode == 124, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["stop_reason"] == "timeout" and doc["exit_code"] is None
    assert "guest exit code none" in r.stderr


def test_a_run_result_has_no_exit_code_unless_the_guest_ended():
    from kvmpy.result import RunResult, StopReason
    from kvmpy.stats import ExitStats

    def result(reason, code=0):
        return RunResult(reason, code, "", {}, {}, ExitStats())

    assert result(StopReason.EXIT, 7).exit_code == 7
    assert result(StopReason.HLT).exit_code == 0
    for reason in (StopReason.TIMEOUT, StopReason.EXCEPTION, StopReason.INTERRUPTED):
        assert result(reason).exit_code is None
        assert result(reason).to_dict()["exit_code"] is None


# --- usage errors are 2, the size parser, --version, -v ----------------------------------------


def test_a_bad_size_is_a_usage_error_that_lists_every_suffix():
    r = kvmpy("run", "hello", "--mem", "5Q")
    no_traceback(r.stderr)
    assert r.returncode == 2
    for suffix in ("K", "M", "G", "T", "iB"):
        assert suffix in r.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args",
    [
        ["run", "hello", "--mem", "2T"],
        ["run", "hello", "--mode", "bogus"],
        ["sched", "--vm", "neo", "--mem", "lots"],
        ["ipc", "--mechanism", "pio", "--size", "5Q"],
        ["ipc", "--mechanism", "pio", "--cpus", "x"],
        ["ipc", "--mechanism", "pio", "--vectors", "9"],
        ["lab", "ipc", "--runs", "2"],
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    r = kvmpy(*args, cwd=tmp_path)
    no_traceback(r.stderr)
    assert r.returncode == 2, (args, r.returncode, r.stderr)


def test_version():
    r = kvmpy("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvmpy ")


@pytest.mark.kvm
def test_verbose_shows_the_machine_on_run(gcc_available):
    quiet = kvmpy("run", "hello")
    loud = kvmpy("run", "-v", "hello")
    assert loud.returncode == quiet.returncode == 0
    assert "kvmpy: INFO:" not in quiet.stderr
    assert "kvmpy: INFO: machine: long-user mode, 64M of RAM" in loud.stderr
    assert "kvmpy: INFO: stopped (exit) after 17 exits" in loud.stderr


# --- smaller ones --------------------------------------------------------------------------------


@pytest.mark.parametrize("example,mode", [("fault", "real"), ("neo", "real")])
def test_an_example_runs_only_in_the_modes_it_declares(example, mode):
    r = kvmpy("run", example, "--mode", mode)
    line = one_error_line(r.stderr)
    assert r.returncode == 2
    assert f"the example {example} runs in" in line and f"not in {mode} mode" in line


def test_build_does_not_make_directories(tmp_path, gcc_available):
    src = tmp_path / "x.c"
    src.write_text("void main(void) {}\n")
    r = kvmpy("build", src, "-o", tmp_path / "nonexistent" / "dir" / "x.elf")
    assert r.returncode == 1
    assert "is not a directory" in one_error_line(r.stderr)
    assert not (tmp_path / "nonexistent").exists()


def test_files_that_are_clearly_not_images_are_named(tmp_path):
    source = tmp_path / "guest.c"
    source.write_text("#include <kvmpy.h>\nvoid main(void) { hc_exit(0); }\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to build the guest\n")
    bzimage = tmp_path / "vmlinuz"
    kernel = bytearray(8192)
    kernel[0x1FE:0x200] = b"\x55\xaa"
    kernel[0x202:0x206] = b"HdrS"
    bzimage.write_bytes(bytes(kernel))
    for path, words in (
        (source, "is source code, not a guest image: build it first"),
        (notes, "is a text file, not a guest image"),
        (bzimage, "is a Linux kernel image (bzImage)"),
        (Path(sys.executable).resolve(), "not an executable (ET_EXEC)"),  # an ELF of another kind
    ):
        r = kvmpy("run", path)
        assert r.returncode == 1 and words in one_error_line(r.stderr), r.stderr


def test_restore_of_a_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "snap.tar"
    f.write_bytes(b"x")
    r = kvmpy("restore", f)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "is a file; a snapshot is a directory" in line and "no such" not in line


@pytest.mark.kvm
def test_an_elf_too_big_is_not_told_to_use_load_addr(build_guest):
    r = kvmpy("run", build_guest("void main(void) {}\n", "long"), "--mem", "1M")
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and "give it more with --mem" in line
    assert "--load-addr" not in line


def test_a_raw_image_too_big_is_told_both(tmp_path):
    raw = tmp_path / "big.bin"
    raw.write_bytes(b"\xf4" * 4096)
    r = kvmpy("run", raw, "--mem", "1M", "--load-addr", "0xFFF000", "--mode", "long")
    line = one_error_line(r.stderr)
    assert "--mem" in line and "--load-addr" in line


@pytest.mark.kvm
def test_an_exception_is_counted_as_one_not_as_port_0xe8(gcc_available):
    r = kvmpy("run", "fault", "--json", "--stats")
    assert r.returncode == 125
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["exits"] == {"io": 1, "exception": 1}  # the hypercall, then the page fault
    assert "0xe8" not in doc["stats"]["by_port"]
    assert "exception" in r.stderr and "0xe8" not in r.stderr


@pytest.mark.kvm
def test_trace_exits_shows_hypercall_arguments_and_results(gcc_available):
    r = kvmpy("run", "hello", "--trace-exits")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    calls = [x for x in lines if "hypercall=print_str(0x" in x]
    assert calls and calls[0].count(", 0x") == 3  # four arguments
    assert "    -> print_str returned 0x0" in lines
    assert any(x.startswith("    -> num_exits_by_type returned 0x") for x in lines)

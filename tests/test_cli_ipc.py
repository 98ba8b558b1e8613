"""`kvmpy ipc` as a user runs it: JSON fields, the human table, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kvmpy(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


REQUIRED = {
    "mechanism", "size", "runs", "seconds", "throughput_bytes_per_s", "memcpy_bytes_per_s",
    "ratio_to_memcpy", "userspace_exits", "checksum_ok",
}  # fmt: skip


@pytest.mark.kvm
@pytest.mark.parametrize("mechanism", ["pio", "shm-poll", "shm-irq"])
def test_ipc_json_has_the_documented_fields(mechanism):
    r = kvmpy("ipc", "--mechanism", mechanism, "--size", "5K", "--runs", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) >= REQUIRED
    assert doc["mechanism"] == mechanism and doc["size"] == 5 * 1024 and doc["runs"] == 2
    assert doc["checksum_ok"] is True
    assert doc["memcpy_bytes_per_s"] > 0
    assert doc["ratio_to_memcpy"] == pytest.approx(
        doc["throughput_bytes_per_s"] / doc["memcpy_bytes_per_s"]
    )
    assert (doc["userspace_exits"] == 0) == (mechanism != "pio")


@pytest.mark.kvm
def test_ipc_table_and_pingpong():
    r = kvmpy("ipc", "--mechanism", "shm-poll", "--size", "64K", "--runs", "1", "--same-process")
    assert r.returncode == 0, r.stderr
    assert "throughput" in r.stdout and "host memcpy" in r.stdout and "one process" in r.stdout
    r = kvmpy("ipc", "--mechanism", "shm-irq", "--pingpong", "--msg", "32", "--rounds", "10",
              "--runs", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ping-pong, 32 B messages" in r.stdout and "eventfd" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "0"],
        ["--size", "lots"],
        ["--runs", "40"],
        ["--pingpong", "--msg", "5000"],
        ["--shm-size", "5000"],
        ["--vectors", "9"],
        ["--cpus", "1"],
        ["--cpus", "0,4095"],
        ["--timeout", "-3"],
    ],
)
def test_ipc_bad_arguments_are_one_line_errors(args):
    r = kvmpy("ipc", "--mechanism", "shm-irq", *args)
    assert r.returncode in (1, 2), r.stdout
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kvmpy: error:") or "usage:" in r.stderr


def test_ipc_needs_a_known_mechanism():
    r = kvmpy("ipc", "--mechanism", "smoke-signals")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("mechanism", ["pio", "shm-poll", "shm-irq"])
def test_ipc_runs_a_users_guest_in_both_vms(mechanism):
    r = kvmpy("ipc", "--guest", "ipc-hello", "--mechanism", mechanism)
    assert r.returncode == 0, r.stderr
    assert "[sender] peer 0 got: hello back from peer 1" in r.stdout
    assert f"[receiver] peer 1 got: hello from peer 0 over {mechanism}" in r.stdout


@pytest.mark.kvm
def test_ipc_user_guest_that_faults_is_reported(tmp_path):
    src = tmp_path / "bad.c"
    src.write_text(
        "#include <kvmpy.h>\n#include <kvmpy/ipc.h>\n"
        "int main(void) { if (kvmpy_ipc_info()->peer_id == 1) *(volatile int *)0x7fffffff0 = 1;"
        " return 0; }\n"
    )
    elf = tmp_path / "bad.elf"
    assert kvmpy("build", str(src), "-o", str(elf), "--mode", "long-user").returncode == 0
    r = kvmpy("ipc", "--guest", str(elf), "--mechanism", "shm-poll")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kvmpy: error: the receiver VMM") and "page fault" in last

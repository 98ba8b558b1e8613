"""Snapshots move between backends: taken on KVM, continued on unicorn, and the other way
round, at several points of a long deterministic guest, with output identical to an
uninterrupted run (one CPU-state format, each backend mapping to it)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import snapshot
from kvmpy.result import Stop, StopReason

from .test_contract import (
    hashchain_image,
    kvmpy,
    restore_and_run,
    snapshot_after,
    uninterrupted_output,
)

pytestmark = pytest.mark.kvm

DIRECTIONS = [("kvm", "unicorn"), ("unicorn", "kvm")]


@pytest.fixture(scope="module")
def hashchain(tmp_path_factory, gcc_available):
    return hashchain_image(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(hashchain):
    return uninterrupted_output(hashchain)


def snapshot_while_computing(accel: str, image, path, after_lines: int) -> bytes:
    """Snapshot from outside, soon after `after_lines` lines: the guest is then in the middle of
    its computation (not at an exit), with live SSE state."""
    with Machine(MachineConfig(mode="long-user", memory="16M", accel=accel)) as m:
        m.load_file(image)
        errors = []

        def controller():
            try:
                while m.output.count(b"\n") < after_lines:
                    time.sleep(0.0005)
                m.pause()
                snapshot.take(m, path)
                m.end_run(Stop(StopReason.INTERRUPTED, 0, "snapshot taken"))
            except BaseException as e:
                errors.append(e)
                m.request_stop(StopReason.VMM_ERROR, str(e))
            finally:
                try:
                    m.resume()
                except Exception:
                    pass

        t = threading.Thread(target=controller, daemon=True)
        t.start()
        result = m.run(timeout=120)
        t.join(10)
        if errors:
            raise errors[0]
        assert result.message == "snapshot taken", result.message
        return result.output


@pytest.mark.parametrize("source,target", DIRECTIONS)
@pytest.mark.parametrize("lines", [None, 1, 33, 59])
def test_restore_on_the_other_backend_at_an_exit(source, target, lines, hashchain, reference,
                                                 tmp_path):  # fmt: skip
    before = snapshot_after(source, hashchain, tmp_path / "snap", lines)
    assert before + restore_and_run(tmp_path / "snap", target) == reference


@pytest.mark.parametrize("source,target", DIRECTIONS)
@pytest.mark.parametrize("after", [20, 45])
def test_restore_on_the_other_backend_mid_computation(source, target, after, hashchain,
                                                      reference, tmp_path):  # fmt: skip
    before = snapshot_while_computing(source, hashchain, tmp_path / "snap", after)
    assert before + restore_and_run(tmp_path / "snap", target) == reference


@pytest.mark.parametrize("source,target", DIRECTIONS)
def test_kvmpy_restore_accel(source, target, hashchain, reference, tmp_path):
    before = snapshot_after(source, hashchain, tmp_path / "snap", 10)
    r = kvmpy("restore", str(tmp_path / "snap"), "--accel", target, "--json")
    assert r.returncode == 0, r.stderr.decode()
    out, doc = r.stdout.rsplit(b"\n{", 1)
    assert before + out + b"\n" == reference
    assert json.loads(b"{" + doc)["stop_reason"] == "exit"


def test_a_kvm_snapshot_restores_without_kvm(hashchain, reference, tmp_path):
    """Restoring where /dev/kvm is missing falls back to unicorn, and says so."""
    before = snapshot_after("kvm", hashchain, tmp_path / "snap", 5)
    r = kvmpy("restore", str(tmp_path / "snap"), env={"KVMPY_DEV": str(tmp_path / "no-kvm")})
    assert r.returncode == 0, r.stderr.decode()
    assert before + r.stdout == reference
    assert b"running on the unicorn backend" in r.stderr
    assert r.stderr.count(b"\n") == 1

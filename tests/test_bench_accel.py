"""`kvmpy bench accel`: what it reports and that both backends ran the same guests; never its
speed (the benchmark itself is where speed is judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from kvmpy.benchmarks import accel as bench

KVMPY = [sys.executable, "-m", "kvmpy"]


def test_the_kernel_is_the_instructions_it_claims():
    image = bench.loop_image(7)
    insns = list(Cs(CS_ARCH_X86, CS_MODE_64).disasm(image, 0))
    assert sum(i.size for i in insns) == len(image)
    loop = [i for i in insns if 0x19 <= i.address < 0x3B]
    assert len(loop) == bench.KERNEL_INSNS and loop[-1].mnemonic == "jne"
    assert int(loop[-1].op_str, 16) == 0x19
    assert len(insns) - len(loop) == bench.KERNEL_EXTRA


@pytest.mark.kvm
def test_both_backends_with_ratios(gcc_available, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    doc = bench.run(runs=1, target_s=0.02)
    assert set(doc["backends"]) == {"kvm", "unicorn"}
    for b in doc["backends"].values():
        assert b["cpl0_ns_per_insn"] > 0 and b["cpl3_ns_per_insn"] > 0
        assert b["hypercall_cpl0_us"] > 0 and b["create_ms"] > 0
        assert b["counts"]["cpl0_loop"] >= 100
    r = doc["ratios"]
    k, u = doc["backends"]["kvm"], doc["backends"]["unicorn"]
    assert r["cpl0_speedup"] == pytest.approx(k["cpl0_ns_per_insn"] / u["cpl0_ns_per_insn"],
                                              rel=0.01)  # fmt: skip
    assert doc["c_hypercall_cpl0_us"] > 0
    assert set(doc["goals"]) >= {"cpl0_met", "cpl3_met"}


def test_without_kvm_unicorn_alone_is_measured(tmp_path):
    env = {**os.environ, "KVMPY_DEV": str(tmp_path / "no-kvm"), "XDG_CACHE_HOME": str(tmp_path)}
    code = (
        "import json; from kvmpy.benchmarks import accel; "
        "print(json.dumps(accel.run(runs=1, target_s=0.01)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert list(doc["backends"]) == ["unicorn"] and "kvm" in doc["unavailable"]
    assert "ratios" not in doc


def test_cli_refuses_a_bad_plot_path(tmp_path):
    r = subprocess.run(
        [*KVMPY, "bench", "accel", "--plot", str(tmp_path / "x.txt")], capture_output=True
    )
    assert r.returncode == 2 and b"plot file must end in" in r.stderr

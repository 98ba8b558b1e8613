"""kvmpy lab lhp: the figures it derives, and its short run end to end (what CI runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmpy.lab.lhp import VARIANTS, goal, jain, plan, reference, summarize


def run(variant, vcpus, hosts, throughput, cpu_s=1.0, r=0, correct=True):
    return {
        "variant": variant, "vcpus": vcpus, "host_cpus": hosts, "round": r,
        "correct": correct, "exit": {"state": "exit", "code": 0 if correct else 1},
        "throughput": throughput, "throughput_per_cpu_s": throughput / cpu_s,
        "cpu_of_wall": cpu_s, "spin_fraction": 0.0, "lhp_guest": 0, "fairness": 1.0,
    }  # fmt: skip


def test_jain_index():
    assert jain([5, 5, 5, 5]) == 1.0
    assert jain([8, 0, 0, 0]) == 0.25
    assert jain([0, 0]) is None


def test_summary_takes_medians_and_ranges_per_configuration():
    raw = [run("pv-sched", 4, 1, t, r=i) for i, t in enumerate((10.0, 30.0, 20.0))]
    raw.append({"variant": "pv-sched", "vcpus": 4, "host_cpus": 2, "unsupported": "no"})
    out = summarize(raw)
    one = next(e for e in out if e["host_cpus"] == 1)
    assert one["throughput"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert one["runs"] == 3 and one["correct"] and one["failures"] == []
    assert next(e for e in out if e["host_cpus"] == 2)["unsupported"] == "no"


def test_goal_compares_the_best_mitigation_with_naive_and_one_vcpu():
    raw = [
        run("naive-threads", 1, 1, 1000.0, cpu_s=0.5),  # a busy host: half the CPU
        run("naive-threads", 4, 1, 1.0),
        run("naive-sched", 4, 1, 2.0),
        run("pv-sched", 4, 1, 450.0, cpu_s=0.5),
        run("pv-yield-sched", 4, 1, 900.0),
    ]
    results = summarize(raw)
    ref = reference(results)
    assert ref["t1"] == 1000.0 and ref["t1_per_cpu_s"] == 2000.0
    g = goal(results, ref)
    assert g["best"] == "pv-yield-sched" and g["best_naive"] == "naive-sched"
    assert g["vs_naive"] == 450.0
    assert g["vs_t1_per_host_cpu"] == pytest.approx(0.9)
    assert g["vs_t1_per_cpu_s"] == pytest.approx(0.45)
    assert g["met_wall"] and not g["met_per_cpu_s"] and g["met"]
    assert not goal(summarize(raw[:1]), ref)["evaluated"]


def test_plans():
    short, full = plan(), plan(full=True)
    assert (1, 1) in short.configs and (4, 1) in short.configs
    assert {n for n, _ in full.configs} == {1, 2, 4, 8}
    assert full.runs >= 5 and short.runs >= 3
    assert short.variants == [v.name for v in VARIANTS]
    # Every variant once per round, in every configuration (1 vCPU only on one host CPU).
    assert len(short.items()) == short.runs * len(short.configs) * len(VARIANTS)


@pytest.mark.kvm
def test_the_short_lab_writes_its_report(tmp_path, gcc_available):
    out = tmp_path / "lhp"
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "lab", "lhp", "--out", str(out)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    for name in ("report.md", "results.json", "throughput.png", "relative.png", "spinning.png"):
        assert (out / name).exists(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert all(e.get("correct", True) for e in doc["results"])  # every counter exact
    assert {e["variant"] for e in doc["results"]} == {v.name for v in VARIANTS}
    g = doc["goal"]
    assert g["evaluated"] and g["vs_naive"] >= 3
    assert doc["calibration"]["exit_us"] > 0
    text = (out / "report.md").read_text()
    assert "## The host" in text and "Load average" in text and "## The goal" in text
    assert "4 vCPUs on 1 host CPU" in text and "goal (4 vCPUs" in r.stdout

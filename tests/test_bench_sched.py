"""kvmpy bench sched: a quick run of the real benchmark, its report, and its arguments."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from kvmpy.benchmarks import sched as bench


@pytest.fixture(scope="module")
def quick_doc(gcc_available):
    # Short runs: this checks the plumbing and the report, not the accuracy (that needs 5 s).
    return bench.run(duration=0.2, quanta=[0.002, 0.010], runs=1)


@pytest.mark.kvm
def test_quick_run_reports_every_quantum_and_the_baseline(quick_doc):
    doc = quick_doc
    assert doc["benchmark"] == "sched" and doc["weights"] == [7, 3]
    assert [q["quantum_s"] for q in doc["quanta"]] == [0.002, 0.010]
    for q in doc["quanta"]:
        assert len(q["runs"]) == 1
        assert abs(q["host_error_pp"]) < 50 and q["switches"] > 0
        assert q["switch_cost_us"] > 0 and q["exit_latency_us"] > 0
        assert 0 < q["efficiency"] < 2 and 0 < q["cpu_of_wall"] <= 1.01
        assert q["host_share"] == pytest.approx(0.7 + q["host_error_pp"] / 100)
    assert doc["threads"]["nice"] == [0, 4]
    assert doc["solo"]["progress_per_s"] > 0 and len(doc["solo"]["runs_progress_per_s"]) == 4
    assert doc["goal_met"] in (True, False) and doc["goal_runs_met"] in (0, 1)
    json.dumps(doc)


@pytest.mark.kvm
def test_render_and_plot(quick_doc, tmp_path):
    from rich.console import Console

    out = io.StringIO()
    bench.render(quick_doc, Console(file=out, width=100))
    text = out.getvalue()
    assert "Weighted 70/30" in text and "10 ms" in text and "threads" in text
    assert "goal: at a 10 ms quantum" in text
    assert "the goal is stated for 5 s runs" in text
    path = tmp_path / "sched.png"
    bench.plot(quick_doc, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_goal_is_judged_on_both_shares():
    assert bench._met({"host_error_pp": 0.9, "progress_error_pp": -0.99})
    assert not bench._met({"host_error_pp": 0.2, "progress_error_pp": 1.01})
    assert not bench._met({"host_error_pp": -1.2, "progress_error_pp": 0.0})


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quanta", ","], "no quanta"),
        (["--quanta", "1ms,0"], "quantum must be positive"),
        (["--duration", "-1"], "not a duration"),
        (["--runs", "0"], "at least 1"),
    ],
)
def test_usage_errors(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "sched", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr

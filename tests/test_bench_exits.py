"""`kvmpy bench exits`: structure and consistency of what it reports, never its speed (these
machines are too noisy for timing assertions; the benchmark itself is where speed is judged)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kvmpy.benchmarks import BenchmarkError, build_c, cache_dir, pinned
from kvmpy.benchmarks import exits as bench
from kvmpy.cli import main

N = 2000
RUNS = 2

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="the C reference needs gcc")
needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, so the C reference is compiled once and ~/.cache stays clean."""
    path = tmp_path_factory.mktemp("xdg-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def report(cache):
    if shutil.which("gcc") is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs gcc and a usable /dev/kvm")
    seen = []
    doc = bench.run(N, RUNS, "long", on_run=lambda side, i, s: seen.append((side, i, s)))
    return doc, seen


# --- the guest ---------------------------------------------------------------------------------


def test_guest_bytes_match_the_documented_assembly():
    image = bench.guest_image(0x01020304)
    assert image == bytes.fromhex(
        "B9 04 03 02 01"  # mov ecx, 0x01020304
        "B8 03 00 00 00 66 BA 00 05 EF FF C9 75 F2"  # 1: mov eax,3; mov dx,0x500; out; dec; jnz 1b
        "31 C0 31 FF EF"  # xor eax,eax; xor edi,edi; out dx,eax
    )
    # jnz lands on the loop's first instruction.
    assert 19 + (image[18] - 256) == 5


@pytest.mark.parametrize("n", [0, -1, 1 << 32])
def test_guest_rejects_counts_the_loop_cannot_express(n):
    with pytest.raises(BenchmarkError):
        bench.guest_image(n)


# --- building the C reference ------------------------------------------------------------------


@needs_gcc
def test_c_reference_is_built_once_per_source(cache):
    first = build_c("exitloop.c")
    assert first.is_relative_to(cache_dir()) and os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns
    assert build_c("exitloop.c") == first
    assert first.stat().st_mtime_ns == mtime


def test_missing_compiler_is_a_clear_error(cache):
    with pytest.raises(BenchmarkError, match="not found"):
        build_c("exitloop.c", cc="/nonexistent/gcc")


def test_failing_compiler_is_a_clear_error(cache):
    with pytest.raises(BenchmarkError, match="failed to build exitloop.c"):
        build_c("exitloop.c", cc="false")


def test_pinning_restores_the_affinity():
    before = os.sched_getaffinity(0)
    cpu = max(before)
    with pinned(cpu):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


# --- the benchmark (runs guests) ---------------------------------------------------------------


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_report_structure(report):
    doc, _ = report
    assert doc["benchmark"] == "exits"
    assert doc["mode"] == "long"
    assert doc["runs"] == RUNS
    assert doc["exits_per_run"] == N + 1
    assert doc["cpu"] == max(os.sched_getaffinity(0))
    assert doc["goal"] == 1.25
    assert doc["goal_met"] == (doc["ratio"] <= 1.25)
    assert set(doc["breakdown"]) >= {
        "interpreter_ns_per_exit",
        "floor_over_c",
        "kvmpy_loop_ns_per_exit",
        "kvmpy_over_floor",
        "kvmpy_vmm_ns_per_exit",
    }
    json.dumps(doc)  # JSON-ready as it stands


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_every_side_measured_the_same_exits(report):
    doc, seen = report
    for side in bench.SIDES:
        d = doc[side]
        assert d["exits"] == N + 1
        assert len(d["runs_ns_per_exit"]) == RUNS
        assert all(v > 0 for v in d["runs_ns_per_exit"])
        assert min(d["runs_ns_per_exit"]) <= d["ns_per_exit_median"] <= max(d["runs_ns_per_exit"])
    assert all(s.exits == N + 1 for _, _, s in seen)


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_runs_are_interleaved(report):
    _, seen = report
    assert [(side, i) for side, i, _ in seen] == [
        (side, i) for i in range(RUNS) for side in bench.SIDES
    ]


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_ratio_and_breakdown_follow_from_the_medians(report):
    doc, _ = report
    c = doc["c"]["ns_per_exit_median"]
    floor = doc["python_floor"]["ns_per_exit_median"]
    kvm = doc["kvmpy"]["ns_per_exit_median"]
    b = doc["breakdown"]
    assert doc["ratio"] == pytest.approx(kvm / c, abs=5e-4)
    assert b["floor_over_c"] == pytest.approx(floor / c, abs=5e-4)
    assert b["kvmpy_over_floor"] == pytest.approx(kvm / floor, abs=5e-4)
    assert b["interpreter_ns_per_exit"] + b["kvmpy_loop_ns_per_exit"] == pytest.approx(
        kvm - c, abs=0.2
    )
    assert b["kvmpy_vmm_ns_per_exit"] > 0


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_long_user_mode_runs_and_says_what_dominates(cache):
    doc = bench.run(200, 1, "long-user")
    assert all(doc[side]["exits"] == 201 for side in bench.SIDES)
    assert "trapping out of guest user mode" in doc["note"]


def test_unknown_cpu_is_refused(cache):
    with pytest.raises(BenchmarkError):
        bench.run(10, 1, "long", cpu=max(os.sched_getaffinity(0)) + 1000)


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_table_and_plot_render(report, tmp_path):
    from rich.console import Console

    doc, _ = report
    console = Console(record=True, width=100)
    bench.render(doc, console)
    text = console.export_text()
    assert "ratio kvmpy / C" in text and "floor − C" in text
    path = tmp_path / "exits.png"
    bench.plot(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command line --------------------------------------------------------------------------


@pytest.mark.kvm
@needs_gcc
@needs_kvm
def test_cli_json(cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmpy",
            "bench",
            "exits",
            "--json",
            "--exits",
            str(N),
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["exits_per_run"] == N + 1 and doc["runs"] == 1
    assert doc["kvmpy"]["exits"] == doc["c"]["exits"] == N + 1
    # Fewer runs and exits than figures worth quoting: the command says so (on stderr, off
    # the JSON), in terms of the product, not of how it was specified.
    assert "quick look" in proc.stderr and "issue" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--runs", "0"],
        ["--runs", "x"],
        ["--exits", "0"],
        ["--exits", "-5"],
        ["--exits", str(1 << 32)],
        ["--mode", "real"],
        ["--cpu", "-1"],
        ["--cpu", str(max(os.sched_getaffinity(0)) + 1000)],
        ["--plot", "out.txt"],
        ["--plot", "/nonexistent/dir/out.png"],
    ],
)
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "exits", *args])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bench_needs_a_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench"])
    assert e.value.code == 2


def test_bad_arguments_exit_2_from_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "exits", "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--runs" in proc.stderr


def test_missing_gcc_from_the_command_is_one_error_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "exits", "--exits", "10", "--runs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("kvmpy: error: ")
    assert "gcc" in proc.stderr and "Traceback" not in proc.stderr

"""`kvmpy bench persist` at a small size (64 MiB guest, 4 MiB touched): what it reports and how
the figures relate, never how fast they are (the benchmark itself judges speed)."""

from __future__ import annotations

import pytest

from kvmpy.benchmarks import BenchmarkError, build_c
from kvmpy.benchmarks import persist as bench
from kvmpy.cli import main

pytestmark = pytest.mark.kvm

TOUCH_PAGES = 1024


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def report(cache, gcc_available, tmp_path_factory):
    runs = []
    doc = bench.run("64M", "4M", 64.0, 1, tmp_path_factory.mktemp("snaps"), on_run=runs.append)
    assert runs == [0]
    return doc


def test_report_structure(report):
    assert report["benchmark"] == "persist" and report["runs"] == 1 == len(report["samples"])
    assert report["memory"] == 64 << 20 and report["touch"] == 4 << 20
    s = report["snapshot"]
    assert TOUCH_PAGES <= s["pages_written"] < TOUCH_PAGES + 64  # the work area and a little
    assert s["memory_bytes"] == 64 << 20
    assert s["pages_written"] * 4096 <= s["disk_bytes"] < 2 * s["pages_written"] * 4096
    lazy = report["lazy_restore"]
    assert lazy["pages_total"] == 16384
    # The handler's background pass brings in what the guest has not touched (all of it,
    # if the VM runs long enough), so faults may be few.
    assert 0 <= lazy["pages_faulted_median"] <= lazy["pages_loaded_median"] <= lazy["pages_total"]
    assert lazy["goal_met"] == (lazy["ms_median"] <= bench.LAZY_GOAL_MS)
    for key in ("migrate_idle", "migrate_dirty"):
        m = report[key]
        assert m["goal_met"] == (m["downtime_ms_median"] <= bench.DOWNTIME_GOAL_MS)
        assert m["rounds_median"] == len(m["pages_per_round_last_run"]) >= 2
        assert m["pages_per_round_last_run"][0] == s["pages_written"]
    assert report["migrate_dirty"]["dirtying"] == "16 pages per ms"
    sample = report["samples"][0]["migrate_dirty"]
    assert sample["achieved_dirty_mib_s"] == round(
        sample["pages_per_round"][1] / sample["seconds_per_round"][0] / 256, 1
    )
    assert len(sample["seconds_per_round"]) == len(sample["pages_per_round"])


def test_ratios_follow_from_the_medians(report):
    s, e, lz = report["snapshot"], report["eager_restore"], report["lazy_restore"]
    assert s["ratio_to_ref"] == round(s["ms_median"] / s["ref_write_ms_median"], 2)
    assert e["ratio_to_ref"] == round(e["ms_median"] / e["ref_read_ms_median"], 2)
    assert lz["ratio_to_eager"] == round(lz["ms_median"] / e["ms_median"], 3)
    sample = report["samples"][0]
    assert e["ms_median"] == round(sample["eager"]["restore_to_first_instruction_ms"], 3)
    assert sample["eager"]["pages_faulted"] == 0 and sample["eager"]["lazy"] is False
    assert sample["lazy"]["lazy"] is True


def test_table_and_plot_render(report, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    bench.render(report, console)
    text = console.export_text()
    assert "lazy restore to first KVM_RUN" in text and "dirtying 64 MiB/s" in text
    out = tmp_path / "persist.png"
    bench.plot(report, out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_c_references(cache, gcc_available, tmp_path):
    ref = build_c("persist_ref.c")
    ms, n = bench._ref(ref, "write", tmp_path / "f", 3 << 20)
    assert n == 3 << 20 and ms > 0 and (tmp_path / "f").stat().st_size == n
    ms, n = bench._ref(ref, "read", tmp_path / "f")
    assert n == 3 << 20
    ms, n = bench._ref(ref, "tcp", 5 << 20)
    assert n == 5 << 20
    with pytest.raises(BenchmarkError, match="C reference failed"):
        bench._ref(ref, "read", tmp_path / "missing")


def test_touch_must_fit(cache):
    with pytest.raises(BenchmarkError, match="--touch"):
        bench.run("16M", "16M", 64.0, 1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dirty-rate", "0"], "--dirty-rate must be positive"),
        (["--dir", "/nonexistent/dir"], "is not a directory"),
    ],
)
def test_bad_arguments(args, message, capsys):
    assert main(["bench", "persist", *args]) == 1
    assert message in capsys.readouterr().err

"""kvmpy lab ipc: the plan, the analysis, and a miniature study written end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvmpy.ipc import study as S
from kvmpy.ipc.bench import IpcOptions
from kvmpy.ipc.layout import Mechanism, PioWidth


def test_plan_covers_the_issue_and_skips_slow_pio_unless_full():
    quick, full = S.plan(full=False), S.plan(full=True)
    keys = {it.key for it in quick.items}
    for m in ("pio", "shm-poll", "shm-irq"):
        for size in (4096, 2 << 20):
            assert f"throughput/{m}/{size}" in keys
        assert f"pingpong/{m}/64" in keys
    assert f"throughput/shm-poll/{1 << 30}" in keys and f"throughput/shm-irq/{1 << 30}" in keys
    assert f"throughput/pio/{1 << 30}" not in keys
    assert any(s["mechanism"] == "pio" and s["size"] == 1 << 30 for s in quick.skipped)
    assert f"throughput/pio/{1 << 30}" in {it.key for it in full.items} and not full.skipped
    assert all(it.options.runs >= 5 for it in quick.items)
    for it in quick.items:
        it.options.validated()


def _fake_run(mech, size, tput, exits=0, ratio=None):
    return {
        "key": f"throughput/{mech}/{size}", "mechanism": mech, "size": size,
        "throughput_bytes_per_s": tput, "seconds": size / tput, "userspace_exits": exits,
        "ratio_to_memcpy": ratio, "memcpy_bytes_per_s": tput / ratio if ratio else None,
        "checksum_ok": True,
    }  # fmt: skip


def test_goals_follow_the_figures():
    ref = {"exit_round_trip": {"c_seconds": 70e-6, "kvmpy_seconds": 75e-6}}
    doc = {
        "references": ref,
        "throughput": [
            _fake_run("shm-poll", 1 << 30, 9e9, ratio=0.9),
            _fake_run("shm-irq", 1 << 30, 4e9, exits=0),
            _fake_run("shm-irq", 4096, 1e8, exits=0),
            _fake_run("pio", 4096, 3e6, exits=10),
            _fake_run("pio", 2 << 20, 4e6, exits=5000),
        ],
    }
    g = S.goals(doc)
    assert g["shm_poll_1g_vs_memcpy"]["met"]
    assert g["shm_irq_zero_exits"]["met"]
    pio = g["pio_string_vs_exit_round_trip"]
    assert not pio["met"] and pio["best_size"] == 2 << 20
    assert pio["ratio"] == pytest.approx(4e6 * 70e-6 / 4096)
    doc["throughput"][0]["ratio_to_memcpy"] = 0.8
    doc["throughput"][2]["userspace_exits"] = 1
    g = S.goals(doc)
    assert not g["shm_poll_1g_vs_memcpy"]["met"] and not g["shm_irq_zero_exits"]["met"]


@pytest.mark.kvm
def test_a_small_study_writes_its_report(tmp_path):
    study = S.Study(full=False, runs=5, reference_exits=200, reference_rounds=100)

    def add(key, group, **kw):
        study.items.append(S.Item(key, group, IpcOptions(runs=5, **kw)))

    add("throughput/pio/4096", "throughput", mechanism=Mechanism.PIO, size=4096)
    add("throughput/shm-poll/65536", "throughput", mechanism=Mechanism.SHM_POLL, size=65536)
    add("throughput/shm-irq/65536", "throughput", mechanism=Mechanism.SHM_IRQ, size=65536)
    add("pingpong/shm-irq/64", "pingpong", mechanism=Mechanism.SHM_IRQ, size=64, pingpong=10)
    add("pio/dword/coalesced", "pio_variants", mechanism=Mechanism.PIO, size=4096,
        pio_width=PioWidth.DWORD)  # fmt: skip
    add("same_process/shm-poll/65536", "same_process", mechanism=Mechanism.SHM_POLL,
        size=65536, same_process=True)  # fmt: skip
    doc = S.run_study(study)
    files = S.write(doc, tmp_path)
    names = {f.name for f in files}
    assert {"results.json", "report.md", "throughput.png", "latency.png", "breakdown.png"} <= names
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["references"]["exit_round_trip"]["c_seconds"] > 0
    assert saved["references"]["memcpy"]["4096"]["bytes_per_s"] > 0
    assert all(r["checksum_ok"] for r in saved["throughput"])
    report = (tmp_path / "report.md").read_text()
    for needle in ("## 5. Throughput", "| pio | 4 KiB |", "| shm-irq | 64 KiB |",
                   "The notification path", "kvmpy lab ipc --out DIR"):  # fmt: skip
        assert needle in report
    assert "Every byte of every run arrived intact: **yes**" in report
    assert saved["breakdown"]["pio"]["layers"]["sender"]


def test_lab_refuses_fewer_than_five_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "lab", "ipc", "--runs", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )  # fmt: skip
    # A flag value out of range: a usage error.
    assert r.returncode == 2 and "kvmpy: error:" in r.stderr and "at least 5" in r.stderr


def test_lab_refuses_an_unwritable_output_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "lab", "ipc", "--out", str(blocker / "sub")],
        capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("kvmpy: error: cannot write to --out")


def test_breakdown_plot_gives_every_layer_its_own_colour_and_a_readable_legend():
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvmpy.ipc.report import breakdown_figure

    doc = json.loads((Path(__file__).parent.parent / "docs/ipc-study/results.json").read_text())
    fig = breakdown_figure(doc["breakdown"])
    try:
        seen: dict[str, str] = {}
        for ax in fig.axes:
            by_label = {}
            for bars in ax.containers:
                label = bars.get_label()
                color = matplotlib.colors.to_hex(bars.patches[0].get_facecolor())
                if not label.startswith("_"):
                    by_label[label] = color
            # Within a panel, different layers never share a colour...
            assert len(set(by_label.values())) == len(by_label), by_label
            # ...and across panels a layer keeps its colour.
            for label, color in by_label.items():
                assert seen.setdefault(label, color) == color
            legend = ax.get_legend()
            assert legend is not None and len(legend.get_texts()) == len(by_label)
            assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
        assert len(seen) >= 10
    finally:
        plt.close(fig)

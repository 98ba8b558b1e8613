"""kvmpy bench: benchmarks that compare kvmpy with a reference measured in the same run."""

from __future__ import annotations

import importlib

# Benchmarks under `kvmpy bench`, in the order its help lists them. Each is a module
# kvmpy.benchmarks.<name> whose add_parser(sub) adds `kvmpy bench <name>` and sets `func`, so
# adding one is one more name here.
BENCHMARKS = ["exits", "sched", "persist", "smp", "accel", "virtio", "net", "api", "boot"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark",
        description="Benchmarks that measure kvmpy against a reference (a small C program, "
        "host memcpy, ...) in the same run and print the ratio; --json on each gives one JSON "
        "object.",
    )
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"kvmpy.benchmarks.{name}").add_parser(bench)

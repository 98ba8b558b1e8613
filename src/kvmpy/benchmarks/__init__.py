"""Benchmarks behind `kvmpy bench ...`: kvmpy measured against a reference run in the same
process invocation (a small C program, host memcpy, an eventfd ping-pong), never against a
figure remembered from another day.

Each benchmark is a module here with a function that returns a JSON-ready dict and an
`add_parser(sub)` that adds its `kvmpy bench NAME` subcommand (see kvmpy.cli.bench). This
module holds what they share: building the C references, pinning to one CPU, medians.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from .. import plotting
from ..errors import KvmpyError

# The C references are built the way the issue states ("built with gcc"); -O2 because a
# reference compiled without optimisation would flatter kvmpy.
CFLAGS = ("-O2", "-Wall", "-std=gnu11")


class BenchmarkError(KvmpyError):
    """A benchmark could not run: no compiler, a reference program failed, a guest misbehaved."""


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/kvmpy, or ~/.cache/kvmpy (a relative XDG_CACHE_HOME is ignored, as the
    XDG spec asks)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "kvmpy"


def bench_dir() -> Path:
    path = cache_dir() / "bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchmarkError(
            f"cannot create the cache directory {path} ({e.strerror}); point XDG_CACHE_HOME "
            "at a writable directory"
        ) from None
    return path


def c_source(name: str) -> bytes:
    """A C reference shipped with kvmpy (package data under kvmpy/bench_src)."""
    return resources.files("kvmpy").joinpath("bench_src", name).read_bytes()


def build_c(name: str, cc: str = "gcc") -> Path:
    """Compile the shipped C reference `name` with `cc` into the cache, once per source.

    The binary is keyed by a hash of the source, the compiler and the flags, so an upgraded
    kvmpy never runs a stale reference, and it is renamed into place so concurrent runs never
    execute a half-written file.
    """
    source = c_source(name)
    compiler = shutil.which(cc)
    if compiler is None:
        raise BenchmarkError(
            f"the C reference {name} needs a C compiler, and {cc!r} was not found; install gcc "
            "(e.g. apt-get install gcc)"
        )
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, CFLAGS)]))
    out_dir = bench_dir()
    binary = out_dir / f"{Path(name).stem}-{key.hexdigest()[:16]}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        src = Path(tmp) / name
        src.write_bytes(source)
        exe = Path(tmp) / binary.name
        try:
            proc = subprocess.run(
                [compiler, *CFLAGS, "-o", str(exe), str(src)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BenchmarkError(f"could not run {compiler} to build {name}: {e}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise BenchmarkError(
                f"{compiler} failed to build {name} (exit status {proc.returncode}): "
                + " / ".join(detail)
            )
        os.replace(exe, binary)
    return binary


def write_cached(name: str, data: bytes) -> Path:
    """Write `data` to the benchmark cache atomically and return its path."""
    path = bench_dir() / name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_cpu() -> int:
    """The last CPU this process may run on: CPU 0 takes most interrupts and housekeeping."""
    return max(os.sched_getaffinity(0))


@contextmanager
def pinned(cpu: int) -> Iterator[int]:
    """Run the calling thread (and the children it starts) on `cpu` only; restore after.

    Both sides of a comparison run on the same CPU so they see the same cache, frequency and
    interrupt load; on a 2-core shared host this is what keeps run-to-run noise down.
    """
    before = os.sched_getaffinity(0)
    if cpu not in before:
        raise BenchmarkError(
            f"CPU {cpu} is not one this process may use (allowed: {format_cpus(before)})"
        )
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def format_cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- argparse helpers shared by the benchmark subcommands --------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)  # base 10; "100_000" is accepted too
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def cpu_number(text: str) -> int:
    try:
        cpu = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU number: {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise argparse.ArgumentTypeError(
            f"CPU {cpu} is not one this process may use (allowed: {format_cpus(allowed)})"
        )
    return cpu


PLOT_FORMATS = (".png", ".svg", ".pdf")


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    return plotting.save_figure(fig, path, dpi, error=BenchmarkError)


def plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"plot file must end in {', '.join(PLOT_FORMATS)} (got {text!r})"
        )
    # Checked before the benchmark runs, not after minutes of measuring.
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: {parent} is not a writable directory"
        )
    return path


def report(args, doc: dict, render, plot, console=None) -> int:
    """The end of every `kvmpy bench` command: the figures first (one JSON object with --json,
    else the rich rendering), then the plot, so a plot that cannot be written never costs the
    user the figures."""
    import json
    import sys

    from rich.console import Console

    console = console or Console(highlight=False)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    else:
        render(doc, console)
    if args.plot:
        plot(doc, args.plot)
        if not args.json:
            console.print(f"plot: {args.plot}")
    return 0

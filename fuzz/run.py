"""Run one fuzz harness (fuzz/harnesses.py) under atheris, coverage-guided, or without it.

    python fuzz/run.py HARNESS [--runs N] [--seconds S] [--engine atheris|random] [--seed N]
    make fuzz [FUZZ_RUNS=1000000]          # every harness, one after the other, under nice

With atheris (pip install -e '.[fuzz]'), libFuzzer drives the inputs: `-runs`, a per-input
timeout (a hang is a crash), and `-rss_limit_mb` (growing memory is a crash) are passed on, and
crashing inputs are written under fuzz/crashes/HARNESS/. The `random` engine (no atheris) feeds
random and mutated byte strings with the same checks. Either way the last line is a summary:

    fuzz HARNESS: N inputs, 0 crashes, T s (X inputs/s), peak RSS R MiB (R0 MiB after setup)
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harnesses import HARNESSES  # noqa: E402

#: A single input may take this long at most (a hang is a crash).
INPUT_TIMEOUT_S = 10
#: Growing past this is an unbounded allocation.
RSS_LIMIT_MB = 1024


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def summary(name, n, crashes, t0, rss0) -> str:
    dt = time.monotonic() - t0
    return (
        f"fuzz {name}: {n} inputs, {crashes} crashes, {dt:.0f} s ({n / max(dt, 1e-9):.0f} "
        f"inputs/s), peak RSS {rss_mb():.0f} MiB ({rss0:.0f} MiB after setup), "
        f"RSS now {current_rss_mb():.0f} MiB"
    )


def run_random(name: str, harness, runs: int, seconds: float | None, seed: int) -> int:
    rng = random.Random(seed)
    corpus: list[bytes] = [b""]
    crashes = 0
    t0 = time.monotonic()
    rss0 = rss_mb()

    def on_alarm(*_):
        raise TimeoutError(f"one input took more than {INPUT_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, on_alarm)
    n = 0
    while n < runs and (seconds is None or time.monotonic() - t0 < seconds):
        if corpus and rng.random() < 0.5:
            data = bytearray(rng.choice(corpus))
            for _ in range(rng.randint(1, 8)):
                if data and rng.random() < 0.7:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                else:
                    data += rng.randbytes(rng.randint(1, 32))
            data = bytes(data)
        else:
            data = rng.randbytes(rng.randint(0, 512))
        signal.alarm(INPUT_TIMEOUT_S)
        try:
            harness.one_input(data)
        except Exception:
            crashes += 1
            out = HERE / "crashes" / name
            out.mkdir(parents=True, exist_ok=True)
            (out / f"crash-{n}").write_bytes(data)
            traceback.print_exc()
        finally:
            signal.alarm(0)
        if len(corpus) < 1000 and rng.random() < 0.01:
            corpus.append(data)
        n += 1
        if n % 100_000 == 0:
            print(summary(name, n, crashes, t0, rss0), flush=True)
            if current_rss_mb() > RSS_LIMIT_MB:
                print(f"fuzz {name}: RSS over {RSS_LIMIT_MB} MiB: unbounded allocation")
                return 1
    print(summary(name, n, crashes, t0, rss0), flush=True)
    return 1 if crashes else 0


def run_atheris(name: str, harness, runs: int, seconds: float | None) -> int:
    import atheris

    crash_dir = HERE / "crashes" / name
    crash_dir.mkdir(parents=True, exist_ok=True)
    corpus = HERE / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rss0 = rss_mb()
    count = [0]

    def one(data: bytes) -> None:
        count[0] += 1
        harness.one_input(data)

    def done() -> None:
        print(summary(name, count[0], 0, t0, rss0), flush=True)

    import atexit

    atexit.register(done)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-runs={runs}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={crash_dir}/",
        "-max_len=4096",
        "-print_final_stats=1",
    ]
    if seconds:
        argv.append(f"-max_total_time={int(seconds)}")
    atheris.Setup(argv, one)
    atheris.Fuzz()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("harness", choices=sorted(HARNESSES))
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--seconds", type=float)
    p.add_argument("--engine", choices=["atheris", "random"])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["kvmpy"]):
            import kvmpy.hv.kvm.vcpu  # noqa: F401
            import kvmpy.persist.control  # noqa: F401
            import kvmpy.persist.format  # noqa: F401
            import kvmpy.persist.migration  # noqa: F401
    harness = HARNESSES[args.harness]()
    harness.setup()
    print(f"fuzz {args.harness}: engine {engine}, setup done, RSS {current_rss_mb():.0f} MiB",
          flush=True)  # fmt: skip
    if engine == "atheris":
        return run_atheris(args.harness, harness, args.runs, args.seconds)
    return run_random(args.harness, harness, args.runs, args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())

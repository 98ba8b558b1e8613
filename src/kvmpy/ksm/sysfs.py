"""The host's KSM settings and counters, through /sys/kernel/mm/ksm.

    ksm = Ksm()                          # KsmError if this kernel has no KSM
    ksm.status()                         # settings, counters, ksmd's CPU time, memory saved
    ksm.set(pages_to_scan=2000, sleep_millisecs=10, run=1)   # validated first, then written
    saved = ksm.save(); ...; ksm.restore(saved)               # what the lab does

Reading needs nothing; writing needs root. Every value is checked here before anything is
written (the kernel's own checks are looser: it takes any unsigned int for pages_to_scan, and
a few settings fail later with EBUSY), so a typo never reaches the host, and a set of values
is written only if all of them are valid. Nothing in kvmpy writes here unless the user asked
for it (`kvmpy ksm on|off|tune`, or `kvmpy lab ksm`, which puts everything back afterwards).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import KsmError

KSM_DIR = Path("/sys/kernel/mm/ksm")
PAGE_SIZE = 4096
UINT_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class Knob:
    """One writable setting and the values kvmpy accepts for it."""

    name: str
    what: str
    lo: int = 0
    hi: int = UINT_MAX
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> str:
        """The text to write for `value`, or KsmError naming the accepted range."""
        if self.choices:
            if value not in self.choices:
                raise KsmError(
                    f"KSM's {self.name} must be one of {', '.join(self.choices)} (got {value!r})"
                )
            return str(value)
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value, 10)
            except ValueError:
                raise KsmError(f"KSM's {self.name} must be an integer (got {value!r})") from None
        if not isinstance(value, int):
            raise KsmError(f"KSM's {self.name} must be an integer (got {value!r})")
        if not self.lo <= value <= self.hi:
            raise KsmError(
                f"KSM's {self.name} ({self.what}) must be between {self.lo} and {self.hi} "
                f"(got {value})"
            )
        return str(value)


# The writable settings, in the order they are written: the advisor before pages_to_scan (the
# kernel refuses pages_to_scan while the advisor sets it), `run` last, so ksmd starts with
# the new values.
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("advisor_mode", "who sets pages_to_scan", choices=("none", "scan-time")),
        Knob("advisor_max_cpu", "the advisor's CPU limit, percent of one CPU", 1, 100),
        Knob("advisor_min_pages_to_scan", "the advisor's lower bound", 1, 1 << 31),
        Knob("advisor_max_pages_to_scan", "the advisor's upper bound", 1, 1 << 31),
        Knob("advisor_target_scan_time", "the advisor's goal for a full scan, seconds", 1, 3600),
        # More than a million pages (4 GiB) per wake-up keeps ksmd on a CPU for seconds.
        Knob("pages_to_scan", "pages per wake-up", 1, 1_000_000),
        # Older kernels refuse more than a minute; 0 means ksmd never sleeps.
        Knob("sleep_millisecs", "sleep between wake-ups, ms", 0, 60_000),
        Knob("max_page_sharing", "mappings per merged page", 2, (1 << 31) - 1),
        Knob("stable_node_chains_prune_millisecs", "how often chains are pruned, ms", 0, UINT_MAX),
        Knob("merge_across_nodes", "merge pages of different NUMA nodes (0 or 1)", 0, 1),
        Knob("use_zero_pages", "merge zero pages with the kernel's zero page (0 or 1)", 0, 1),
        Knob("smart_scan", "skip pages that did not merge on earlier scans (0 or 1)", 0, 1),
        Knob("run", "0 stop, 1 merge, 2 stop and unmerge everything", 0, 2),
    )
}

#: Read-only counters shown by `status` (those this kernel has).
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "ksm_zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
)

RUN_STATES = {0: "stopped", 1: "running", 2: "stopped, unmerged"}


class Ksm:
    """The host's KSM at `root` (a different root is for tests)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root if root is not None else KSM_DIR)
        if not (self.root / "run").is_file():
            raise KsmError(
                f"this kernel has no same-page merging: {self.root} does not exist "
                "(a kernel built without CONFIG_KSM)"
            )

    # --- reading -------------------------------------------------------------------------------

    def read(self, name: str) -> str:
        try:
            return (self.root / name).read_text().strip()
        except OSError as e:
            raise KsmError(f"cannot read {self.root / name}: {e.strerror}") from None

    def read_int(self, name: str) -> int:
        text = self.read(name)
        try:
            return int(text)
        except ValueError:
            raise KsmError(f"{self.root / name} holds {text!r}, not a number") from None

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def settings(self) -> dict[str, int | str]:
        """Every writable setting this kernel has, as it is now."""
        out: dict[str, int | str] = {}
        for name, knob in KNOBS.items():
            if not self.has(name):
                continue
            if knob.choices:
                out[name] = _selected(self.read(name))
            else:
                out[name] = self.read_int(name)
        return out

    def counters(self) -> dict[str, int]:
        return {name: self.read_int(name) for name in COUNTERS if self.has(name)}

    def status(self) -> dict[str, Any]:
        s = self.settings()
        c = self.counters()
        cpu = ksmd_cpu_seconds()
        return {
            "state": RUN_STATES.get(int(s.get("run", 0)), str(s.get("run"))),
            "settings": s,
            "counters": c,
            # pages_sharing counts the mappings that point at a merged page beyond its first:
            # the pages merging saved (the kernel's own definition).
            "saved_bytes": c.get("pages_sharing", 0) * PAGE_SIZE,
            "ksmd_cpu_s": None if cpu is None else round(cpu, 3),
        }

    # --- writing -------------------------------------------------------------------------------

    def set(self, **values: Any) -> dict[str, int | str]:
        """Check every value, then write them (in KNOBS order); returns what was written."""
        unknown = sorted(set(values) - set(KNOBS))
        if unknown:
            raise KsmError(f"KSM has no setting {unknown[0]!r}")
        missing = [n for n in values if not self.has(n)]
        if missing:
            raise KsmError(f"this kernel's KSM has no {missing[0]} setting")
        texts = {n: KNOBS[n].check(values[n]) for n in KNOBS if n in values}
        lo, hi = "advisor_min_pages_to_scan", "advisor_max_pages_to_scan"
        if lo in values or hi in values:
            cur = self.settings()
            a = int(values.get(lo, cur.get(lo, 1)))
            b = int(values.get(hi, cur.get(hi, a)))
            if a > b:
                raise KsmError(f"KSM's {lo} ({a}) must not be above {hi} ({b})")
        if "pages_to_scan" in values and self.has("advisor_mode"):
            mode = values.get("advisor_mode", _selected(self.read("advisor_mode")))
            if mode != "none":
                raise KsmError(
                    "pages_to_scan is set by KSM's advisor (advisor_mode scan-time); turn it off "
                    "first (kvmpy ksm tune --advisor none)"
                )
        for name, text in texts.items():
            self._write(name, text)
        return {n: values[n] for n in texts}

    def _write(self, name: str, text: str) -> None:
        path = self.root / name
        try:
            with open(path, "w") as f:
                f.write(text)
        except PermissionError:
            raise KsmError(
                f"changing KSM settings needs root: cannot write {path} (permission denied)"
            ) from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise KsmError(
                    f"the kernel refuses to change KSM's {name} while pages are merged; unmerge "
                    "them first (kvmpy ksm off --unmerge)"
                ) from None
            if e.errno == errno.EROFS:
                raise KsmError(f"cannot write {path}: sysfs is read-only here") from None
            raise KsmError(f"the kernel refused KSM's {name} = {text}: {e.strerror}") from None

    def save(self) -> dict[str, int | str]:
        """The current settings, for `restore`."""
        return self.settings()

    def restore(self, saved: dict[str, int | str]) -> list[str]:
        """Put back the settings `save` returned; writes only those that differ now. Returns
        the names of the settings it could not put back (with the reason), never raises for
        one: whoever restores is cleaning up and should try all of them."""
        failed = []
        # `run` last: stop ksmd only after the rest is back, start it only with the old values.
        # Each setting is read again just before: switching the advisor resets pages_to_scan.
        for name in KNOBS:
            if name not in saved or not self.has(name):
                continue
            if name == "pages_to_scan" and saved.get("advisor_mode", "none") != "none":
                continue  # the advisor sets it
            try:
                now = self.settings().get(name)
                if now != saved[name]:
                    self._write(name, str(saved[name]))
            except KsmError as e:
                failed.append(f"{name}: {e}")
        return failed


def _selected(text: str) -> str:
    """'[none] scan-time' -> 'none' (sysfs marks the selected choice with brackets)."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


# --- ksmd ------------------------------------------------------------------------------------------


_ksmd_pid: int | None = None


def ksmd_pid() -> int | None:
    """The pid of the ksmd kernel thread (found once), or None."""
    global _ksmd_pid
    if _ksmd_pid is not None and _comm(_ksmd_pid) == "ksmd":
        return _ksmd_pid
    _ksmd_pid = None
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    # Kernel threads start early: the low pids first.
    for entry in sorted(int(e) for e in entries if e.isdigit()):
        if _comm(entry) == "ksmd":
            _ksmd_pid = entry
            return entry
    return None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time of `pid`: from /proc/PID/schedstat (nanoseconds) where the kernel keeps it,
    else utime + stime from /proc/PID/stat (clock ticks, 10 ms here)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def ksmd_cpu_seconds() -> float | None:
    pid = ksmd_pid()
    return None if pid is None else process_cpu_seconds(pid)


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds pass (KSM is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)

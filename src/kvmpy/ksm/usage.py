"""What one process (one VM) shares through KSM, from /proc.

    /proc/PID/ksm_stat   ksm_merging_pages (pages of this process mapped to a merged page),
                         ksm_rmap_items (pages ksmd tracks), ksm_zero_pages, ksm_process_profit
    /proc/PID/smaps      per mapping: Rss, Pss (a page shared by n mappings counts 1/n), KSM
                         (bytes mapped to merged pages), Anonymous, Swap, and VmFlags `mg`
                         (MADV_MERGEABLE)

kvmpy runs one VM per process, so ksm_stat is the VM's; smaps narrows it to the guest RAM
mappings (the interpreter's own heap is never mergeable). Reading another process's files
needs the same user or root, as ptrace does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

PAGE_SIZE = 4096
_VMA = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ")
#: smaps fields summed over the guest RAM mappings (kB in the file, bytes here).
SMAPS_FIELDS = ("Rss", "Pss", "KSM", "Anonymous", "Private_Dirty", "Shared_Clean",
                "Shared_Dirty", "Swap")  # fmt: skip


def ksm_stat(pid: int | str = "self") -> dict[str, Any] | None:
    """/proc/PID/ksm_stat as a dict (None where the kernel has no such file, before 6.1)."""
    try:
        with open(f"/proc/{pid}/ksm_stat", "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        value = value.strip()
        if value in ("yes", "no"):
            out[key] = value == "yes"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def mappings(
    ranges: Sequence[tuple[int, int]], pid: int | str = "self", smaps: bytes | None = None
) -> dict[str, Any]:
    """Sum of SMAPS_FIELDS (in bytes) over the mappings of `pid` that lie in the address
    ranges [start, end); `vmas` counts them, `mergeable` says whether all are MADV_MERGEABLE.
    A range can be several mappings (the kernel splits one at an madvise or a userfaultfd
    registration)."""
    if smaps is None:
        try:
            with open(f"/proc/{pid}/smaps", "rb") as f:
                smaps = f.read()
        except OSError:
            return {}
    totals = dict.fromkeys(SMAPS_FIELDS, 0)
    vmas = 0
    mergeable = True
    inside = False
    for line in smaps.splitlines():
        m = _VMA.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            inside = any(lo <= start and end <= hi for lo, hi in ranges)
            vmas += inside
            continue
        if not inside:
            continue
        key, _, rest = line.partition(b":")
        name = key.decode(errors="replace")
        if name == "VmFlags":
            mergeable = mergeable and b" mg" in b" " + rest
        elif name in totals:
            parts = rest.split()
            if parts:
                totals[name] += int(parts[0]) * 1024
    out: dict[str, Any] = {name.lower() + "_bytes": v for name, v in totals.items()}
    out["vmas"] = vmas
    out["mergeable"] = bool(vmas) and mergeable
    return out


def vm_memory(regions: Iterable[Any], pid: int | str = "self") -> dict[str, Any]:
    """What a VM's guest RAM (MemoryRegion-likes with hva and size) occupies and shares."""
    regions = list(regions)
    ranges = [(r.hva, r.hva + r.size) for r in regions]
    d: dict[str, Any] = {"ram_bytes": sum(r.size for r in regions)}
    d.update(mappings(ranges, pid))
    stat = ksm_stat(pid)
    if stat is not None:
        d["ksm"] = {
            "merging_pages": stat.get("ksm_merging_pages", 0),
            "rmap_items": stat.get("ksm_rmap_items", 0),
            "zero_pages": stat.get("ksm_zero_pages", 0),
            "process_profit_bytes": stat.get("ksm_process_profit", 0),
            "mergeable": stat.get("ksm_mergeable", False),
        }
    return d


#: /proc/kpageflags bit of a page KSM merged (include/uapi/linux/kernel-page-flags.h).
KPF_KSM = 21
_PFN_MASK = (1 << 55) - 1


def ksm_pages(pid: int | str, hva: int, pages: int):
    """For each of `pages` pages of `pid` from address `hva`: is it a KSM (merged) page? A
    numpy bool array, from /proc/PID/pagemap (the frame of each page) and /proc/kpageflags
    (the frame's flags). Needs root: without it the kernel hides frame numbers (None)."""
    import numpy as np

    try:
        pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(pm, pages * 8, (hva // PAGE_SIZE) * 8)
    finally:
        os.close(pm)
    entries = np.frombuffer(raw, dtype=np.uint64)
    if len(entries) != pages:
        return None
    present = (entries >> np.uint64(63)) & np.uint64(1) == 1
    pfns = entries & np.uint64(_PFN_MASK)
    if present.any() and not pfns[present].any():
        return None  # frame numbers hidden: not root
    try:
        kf = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    out = np.zeros(pages, dtype=bool)
    try:
        for i in np.flatnonzero(present):
            data = os.pread(kf, 8, int(pfns[i]) * 8)
            if len(data) == 8 and (int.from_bytes(data, "little") >> KPF_KSM) & 1:
                out[i] = True
    finally:
        os.close(kf)
    return out

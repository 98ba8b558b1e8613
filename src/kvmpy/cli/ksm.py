"""kvmpy ksm: show and steer the host's same-page merging (/sys/kernel/mm/ksm)."""

from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ksm",
        help="show and set the host's same-page merging (KSM)",
        description="Show or change the host kernel's same-page merging. VMs started with "
        "--mergeable offer their RAM to it; KSM itself is a host setting that only these "
        "commands change (status needs no privileges, the others need root).",
    )
    ops = p.add_subparsers(dest="op", metavar="COMMAND", required=True)
    s = ops.add_parser("status", help="settings, counters, memory saved, ksmd's CPU time")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    on = ops.add_parser("on", help="start merging (ksmd runs)")
    _tuning(on)
    off = ops.add_parser("off", help="stop merging (merged pages stay merged)")
    off.add_argument(
        "--unmerge", action="store_true", help="also give every merged page its own copy again"
    )
    t = ops.add_parser("tune", help="change how fast KSM scans (and more)")
    _tuning(t)
    t.add_argument("--max-page-sharing", metavar="N", help="mappings per merged page (>= 2)")
    t.add_argument("--use-zero-pages", choices=("0", "1"), help="merge empty pages specially")
    t.add_argument("--smart-scan", choices=("0", "1"), help="skip pages that never merge")
    t.add_argument(
        "--advisor", choices=("none", "scan-time"), help="let the kernel set pages-to-scan"
    )
    for q in (on, off, t):
        q.add_argument("--json", action="store_true", help="print the new status as JSON")
    p.set_defaults(func=cmd_ksm, parser=p, tune_parser=t)


def _tuning(p) -> None:
    p.add_argument("--pages-to-scan", metavar="N", help="pages ksmd scans per wake-up")
    p.add_argument("--sleep", metavar="MS", help="milliseconds ksmd sleeps between wake-ups")


def cmd_ksm(args) -> int:
    from ..ksm.sysfs import Ksm

    ksm = Ksm()
    if args.op == "status":
        st = ksm.status()
        st["processes"] = merging_processes()
        _show(st, args.json)
        return 0
    values: dict = {}
    if getattr(args, "pages_to_scan", None) is not None:
        values["pages_to_scan"] = args.pages_to_scan
    if getattr(args, "sleep", None) is not None:
        values["sleep_millisecs"] = args.sleep
    if args.op == "tune":
        for opt, name in (("max_page_sharing", "max_page_sharing"),
                          ("use_zero_pages", "use_zero_pages"), ("smart_scan", "smart_scan"),
                          ("advisor", "advisor_mode")):  # fmt: skip
            if getattr(args, opt) is not None:
                values[name] = getattr(args, opt)
        if not values:
            args.tune_parser.error("nothing to change: give at least one option")
    elif args.op == "on":
        values["run"] = 1
    elif args.op == "off":
        values["run"] = 2 if args.unmerge else 0
    ksm.set(**values)
    _show(ksm.status(), args.json)
    return 0


def merging_processes(limit: int = 20) -> list[dict]:
    """Processes with merged pages, most first (those whose ksm_stat we may read)."""
    from ..ksm.usage import ksm_stat

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = ksm_stat(entry)
        if not st or not st.get("ksm_merging_pages"):
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        out.append({"pid": int(entry), "comm": comm, "merging_pages": st["ksm_merging_pages"]})
    out.sort(key=lambda d: -d["merging_pages"])
    return out[:limit]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _show(st: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st))
        return
    s, c = st["settings"], st["counters"]
    cpu = st.get("ksmd_cpu_s")
    print(
        f"KSM {st['state']}: pages_to_scan {s.get('pages_to_scan')}, sleep "
        f"{s.get('sleep_millisecs')} ms"
        + (f", advisor {s['advisor_mode']}" if s.get("advisor_mode", "none") != "none" else "")
        + (f"; ksmd has used {cpu:.2f} s of CPU" if cpu is not None else "")
    )
    print(
        f"merged: {c.get('pages_shared', 0)} pages shared by {c.get('pages_sharing', 0)} more "
        f"mappings, saving {_mib(st['saved_bytes'])}; {c.get('full_scans', 0)} full scans"
    )
    others = {k: v for k, v in s.items() if k not in ("pages_to_scan", "sleep_millisecs", "run")}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in others.items()))
    procs = st.get("processes") or []
    if procs:
        print("processes with merged pages: " + ", ".join(
            f"{p['comm']}[{p['pid']}] {p['merging_pages']}" for p in procs))  # fmt: skip

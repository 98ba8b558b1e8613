"""kvmpy store: the page stores that deduplicated snapshots share (`ctl snapshot --store`)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="show and reclaim the space of a snapshot page store",
        description="A page store holds the memory of snapshots taken with 'kvmpy ctl SOCK "
        "snapshot DIR --store STORE', each distinct page once. 'du' shows its snapshots and "
        "what sharing saves; 'gc' removes what no snapshot needs any more: the pages of "
        "snapshots whose directory was deleted or now holds another snapshot, and the leftovers "
        "of writes that never finished.",
    )
    ops = p.add_subparsers(dest="op", metavar="COMMAND", required=True)
    du = ops.add_parser("du", help="snapshots, pages and bytes, and what deduplication saves")
    du.add_argument("store", metavar="STORE")
    du.add_argument("--json", action="store_true", help="print one JSON object")
    gc = ops.add_parser("gc", help="remove what no snapshot needs")
    gc.add_argument("store", metavar="STORE")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_store)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_store(args) -> int:
    from ..persist.store import PageStore

    store = PageStore.open(args.store)
    if args.op == "du":
        with store.lock():
            u = store.usage()
        if args.json:
            print(json.dumps(u))
            return 0
        for s in u["snapshots"]:
            state = s["state"] if not s["why"] else f"{s['state']}: {s['why']}"
            print(f"{s['snapshot'][:12]}  {s['pages'] or 0:>9} pages  {s['unique_pages']:>9} "
                  f"only its own  {s['created'] or '?':20}  {s['path']}  ({state})")  # fmt: skip
        ratio = f"{u['dedup_ratio']:.2f}x" if u["dedup_ratio"] else "n/a"
        print(
            f"{u['live_snapshots']} snapshots hold {u['logical_pages']} non-zero pages "
            f"({_mib(u['logical_bytes'])}); the store keeps {u['stored_pages']} pages, "
            f"{u['needed_pages']} of them needed ({ratio} deduplication), in "
            f"{_mib(u['disk_bytes'])} on disk: {_mib(max(u['saved_bytes'], 0))} saved"
        )
        for d in u["damaged_packs"]:
            print(f"DAMAGED: {d['why']}")
        if u["garbage_pages"] or u["dead_snapshots"] or u["uncommitted_packs"]:
            print(
                f"reclaimable by 'kvmpy store gc': {u['garbage_pages']} pages, "
                f"{u['dead_snapshots']} deleted or replaced snapshots, "
                f"{u['uncommitted_packs']} unfinished writes"
            )
        return 0
    with store.lock(exclusive=True, wait=False):
        r = store.gc(dry_run=args.dry_run)
    if args.json:
        print(json.dumps(r))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for d in r["snapshots_dropped"]:
        print(f"{verb} snapshot {d['snapshot'][:12]} ({d['path']}: {d['why']})")
    for d in r["snapshots_kept_unknown"]:
        print(f"kept snapshot {d['snapshot'][:12]} ({d['path']}: {d['why']})")
    print(
        f"{verb} {r['pages_removed']} pages, {_mib(r['bytes_freed'])}"
        + (f"; repacked {r['packs_repacked']} packs" if r["packs_repacked"] else "")
    )
    return 0

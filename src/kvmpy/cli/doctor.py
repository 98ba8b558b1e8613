"""kvmpy doctor: is /dev/kvm usable, what does it offer, and what kind of host is this."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the CPU backends (/dev/kvm, unicorn), their capabilities, the kind of host",
        description="Say which CPU backends are usable here (KVM, and unicorn's binary "
        "translation, which needs no /dev/kvm) and what each supports; whether /dev/kvm is "
        "usable, the KVM API version, the capabilities kvmpy relies on, and the kind of host "
        "(it times a CPL0 loop against a CPL3 loop).",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quick", action="store_true", help="skip the timing probes")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    from ..doctor import diagnose

    rep = diagnose(measure=not args.quick)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0 if rep.ok else 1
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False)
    backends = Table(title="CPU backends")
    backends.add_column("backend")
    backends.add_column("usable")
    backends.add_column("supports")
    backends.add_column("lacks")
    for name, b in rep.backends.items():
        usable = "[green]yes[/]" if b["usable"] else "[red]no[/]"
        if name == "unicorn" and b.get("version"):
            name = f"unicorn {b['version']}"
        backends.add_row(name, usable, ", ".join(b["supports"]), ", ".join(b["lacks"]))
    con.print(backends)
    uni = rep.backends.get("unicorn", {})
    if not uni.get("usable", True):
        con.print(f"[yellow]The unicorn backend is not usable:[/] {uni['error']}")
    elif "cpl0_ns_per_insn" in uni:
        con.print(
            f"unicorn runs a tight loop at {uni['cpl0_ns_per_insn']:.2f} ns per instruction at "
            f"CPL0 and {uni['cpl3_ns_per_insn']:.2f} ns at CPL3 (any host, no /dev/kvm needed)"
        )
    if not rep.kvm_usable:
        con.print(f"[bold red]/dev/kvm is not usable:[/] {rep.kvm_error}")
        if rep.ok:
            con.print("kvmpy runs guests on the unicorn backend here (binary translation).")
        return 0 if rep.ok else 1
    con.print(f"[green]/dev/kvm is usable[/], KVM API version {rep.api_version}")
    table = Table(title="KVM capabilities kvmpy uses")
    table.add_column("capability")
    table.add_column("value", justify="right")
    table.add_column("used for")
    for name, cap in rep.capabilities.items():
        value = str(cap["value"]) if cap["value"] else "[red]missing[/]"
        table.add_row(name + (" (required)" if cap["required"] else ""), value, cap["used_for"])
    con.print(table)
    if rep.missing_required:
        con.print(f"[bold red]kvmpy needs {', '.join(rep.missing_required)}[/]")
    con.print(f"Host kind: [bold]{rep.host_kind}[/]")
    if rep.host_summary:
        con.print(rep.host_summary)
    gcc = rep.gcc
    if not gcc.get("gcc"):
        con.print("[yellow]gcc not found: 'kvmpy build' and the bundled examples need it[/]")
    else:
        missing = [f for f in ("-m16", "-m32", "-m64") if not gcc.get(f)]
        con.print(
            "gcc builds guests for every mode"
            if not missing
            else f"[yellow]gcc cannot build {', '.join(missing)} guests[/]"
        )
    return 0 if rep.ok else 1

"""kvmpy examples: the bundled example guests."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "examples",
        help="list the bundled example guests",
        description="List the example guests bundled with kvmpy. 'kvmpy run NAME' builds one "
        "(cached) and runs it; '--mode' picks the build.",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--build", action="store_true", help="build every example for every mode")
    p.set_defaults(func=cmd_examples)


def cmd_examples(args) -> int:
    from ..sdk.examples import examples

    exs = examples()
    if args.build:
        for ex in exs:
            for mode in ex.modes:
                ex.build(mode)
    if args.json:
        print(json.dumps([
            {
                "name": e.name,
                "description": e.description,
                "modes": [m.value for m in e.modes],
                "default_mode": e.default_mode.value,
                "format": "raw" if e.raw else "elf",
                "source": str(e.source),
            }
            for e in exs
        ], indent=2))  # fmt: skip
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Bundled examples (kvmpy run NAME [--mode MODE])")
    table.add_column("name", style="bold")
    table.add_column("default mode")
    table.add_column("modes")
    table.add_column("what it does")
    for e in exs:
        modes = " ".join(m.value for m in e.modes)
        table.add_row(e.name, e.default_mode.value, modes, e.description)
    Console().print(table)
    return 0

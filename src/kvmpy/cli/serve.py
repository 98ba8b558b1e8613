"""kvmpy serve: the management API (Firecracker-compatible REST on a Unix socket)."""

from __future__ import annotations

import re
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the Firecracker-compatible management API",
        description="Serve Firecracker's REST API on a Unix socket (mode 0600): one VM at the "
        "root as Firecracker, or with --multi many VMs under /vms/{id}/. Each VM runs in its "
        "own VMM process. GET /openapi.json describes every path (docs/api.md). SIGINT or "
        "SIGTERM stops every VM and ends the daemon.",
    )
    p.add_argument("--api-sock", required=True, metavar="PATH", help="the API's Unix socket")
    p.add_argument("--multi", action="store_true", help="many VMs, under /vms/{id}/...")
    p.add_argument("--id", default="anonymous-instance", metavar="ID",
                   help="the VM's id (single-VM mode, and --config-file's VM)")  # fmt: skip
    p.add_argument("--config-file", metavar="FILE.json",
                   help="configure and start a VM from Firecracker's config-file format")  # fmt: skip
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the API and the dashboard on TCP (needs --token-file)")  # fmt: skip
    p.add_argument("--token-file", metavar="FILE",
                   help="the bearer token the TCP listener requires (at least 16 bytes)")  # fmt: skip
    p.add_argument("--root", metavar="DIR",
                   help="confine every host path in requests to DIR (as Firecracker's jailer "
                   "chroot: '/x' means DIR/x)")  # fmt: skip
    p.add_argument("--state-dir", metavar="DIR",
                   help="where VMM control sockets and specs live (default: a new temporary "
                   "directory)")  # fmt: skip
    p.set_defaults(func=cmd_serve, parser=p)


def cmd_serve(args) -> int:
    from ..api.models import ID_PATTERN
    from ..api.server import read_token, serve

    if not re.match(ID_PATTERN, args.id):
        args.parser.error("--id: 1-64 letters, digits, '_', '.' or '-', not starting with '.'")
    if args.http and not args.token_file:
        args.parser.error("--http needs --token-file (the TCP listener wants a bearer token)")
    if args.token_file and not args.http:
        args.parser.error("--token-file goes with --http")
    token = read_token(args.token_file) if args.token_file else None

    def announce(text: str) -> None:
        sys.stderr.write(f"kvmpy: {text}\n")
        sys.stderr.flush()

    return serve(api_sock=args.api_sock, multi=args.multi, instance_id=args.id, http=args.http,
                 token=token, config_file=args.config_file, root=args.root,
                 state_dir=args.state_dir, announce=announce)  # fmt: skip

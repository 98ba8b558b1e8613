"""`kvmpy serve`: the API on a Unix socket (mode 0600, as Firecracker's), optionally on a TCP
listener that wants a bearer token, served by uvicorn in one asyncio event loop that also
supervises the VMM processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable

from ..unixsock import listen_unix as _listen_unix
from .errors import ApiError

log = logging.getLogger("kvmpy.api")
MIN_TOKEN_BYTES = 16


def listen_unix(path: str) -> socket.socket:
    """The API's Unix socket, owner only; a stale socket is replaced, a live one or any other
    file is an error."""
    return _listen_unix(path, what="the API socket", option="--api-sock", error=ApiError,
                        backlog=128)  # fmt: skip


def listen_tcp(address: str) -> socket.socket:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ApiError(f"--http {address!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise ApiError(f"--http {address}: {e}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise ApiError(f"cannot listen on {address}: {e.strerror}") from None
    sock.listen(128)
    return sock


def read_token(path: str) -> str:
    try:
        with open(path, "rb") as f:
            token = f.read(4096).strip()
    except OSError as e:
        raise ApiError(f"cannot read the token file {path}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ApiError(f"the token in {path} is {len(token)} bytes; use at least "
                       f"{MIN_TOKEN_BYTES} (e.g. head -c 32 /dev/urandom | base64 > {path})")  # fmt: skip
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(f"the token in {path} must be ASCII text") from None
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ApiError(f"the token in {path} must be one word of printable characters")
    return text


def serve(
    *,
    api_sock: str,
    multi: bool = False,
    instance_id: str = "anonymous-instance",
    http: str | None = None,
    token: str | None = None,
    config_file: str | None = None,
    root: str | None = None,
    state_dir: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM; every VM is stopped before this returns."""
    import uvicorn

    from .app import BearerAuth, create_app
    from .resources import PathPolicy
    from .supervisor import Daemon

    paths = PathPolicy(root)
    unix = listen_unix(api_sock)
    tcp = None
    try:
        if http is not None:
            if token is None:
                raise ApiError("--http needs --token-file: the TCP listener wants a bearer token")
            tcp = listen_tcp(http)
    except BaseException:
        unix.close()
        with contextlib.suppress(OSError):
            os.unlink(api_sock)
        raise

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the daemon handles SIGINT/SIGTERM itself
            yield

    async def main() -> int:
        daemon = Daemon(multi=multi, instance_id=instance_id, paths=paths, state_dir=state_dir)
        app = create_app(daemon)
        common = {"log_level": "warning", "access_log": False, "lifespan": "off",
                  "timeout_graceful_shutdown": 3}  # fmt: skip
        servers = [(Server(uvicorn.Config(app, **common)), unix)]
        if tcp is not None:
            assert token is not None
            servers.append((Server(uvicorn.Config(BearerAuth(app, token), **common)), tcp))
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def stop(signum: int) -> None:
            log.warning("%s: stopping every VM", signal.Signals(signum).name)
            stopping.set()
            for s, _ in servers:
                s.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        daemon.start()
        status = 0
        try:
            if config_file is not None:
                from . import config_file as cf

                resources = await asyncio.to_thread(cf.load, config_file, paths)
                vm = daemon.vms.get(instance_id) or daemon.create(instance_id)
                vm.resources = resources
                await vm.start()
            if announce is not None:
                announce(f"serving the API on {api_sock}" + (" (many VMs: /vms/{id}/...)"
                                                              if multi else ""))  # fmt: skip
                if tcp is not None:
                    h, p = tcp.getsockname()[:2]
                    announce(f"API and dashboard on http://{h}:{p}/ (bearer token required: "
                             "open /?access_token=TOKEN in a browser)")  # fmt: skip
            await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in servers))
        except ApiError as e:
            if announce is not None:
                announce(f"error: {e}")
            status = 1
        finally:
            await daemon.close()
        return status

    try:
        return asyncio.run(main())
    finally:
        unix.close()
        if tcp is not None:
            tcp.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(api_sock).st_mode):
                os.unlink(api_sock)
        sys.stderr.flush()

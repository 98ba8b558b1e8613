"""Listening Unix sockets for the VMM's control channel and the API daemon."""

from __future__ import annotations

import os
import socket
import stat

from .errors import KvmpyError


def listen_unix(path: str | os.PathLike, *, what: str, option: str,
                error: type[KvmpyError], backlog: int) -> socket.socket:  # fmt: skip
    """A listening Unix socket at `path`, owner only (whoever can connect controls a VM). A
    stale socket (left by a process that died) is replaced; a live one, or any other file, is
    `error`, naming `what` the socket is and the `option` that chooses another path."""
    path = os.fspath(path)
    if len(os.fsencode(path)) >= 108:
        raise error(f"{what} path {path} is too long for a unix socket")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise error(f"{path} exists and is not a socket; choose another {option}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise error(f"another process serves {path}; choose another {option}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise error(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock

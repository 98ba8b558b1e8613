"""Where kvmpy keeps downloaded and built guest kernels and initramfs inputs.

$KVMPY_CACHE_DIR, else $XDG_CACHE_HOME/kvmpy (an absolute XDG_CACHE_HOME only, as the XDG spec
asks), else ~/.cache/kvmpy; the same root as the SDK's example builds. Never inside the clone:
a Debian kernel package is ~70 MB and a kernel build tree ~1.5 GB.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError


def cache_root() -> Path:
    base = os.environ.get("KVMPY_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "kvmpy"


def cache_subdir(name: str) -> Path:
    path = cache_root() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the cache directory {path} ({e.strerror}); point KVMPY_CACHE_DIR "
            "or XDG_CACHE_HOME at a writable directory"
        ) from None
    return path


def kernels_dir() -> Path:
    return cache_subdir("kernels")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees the old file, the whole new one, or none: two kvmpy
    processes extracting the same kernel must not see each other's half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; these are plain cache files
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

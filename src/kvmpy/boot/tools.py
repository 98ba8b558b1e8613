"""Small static Linux programs kvmpy ships as C source for its busybox guests: what busybox
lacks (`kvmpy-nc`: AF_VSOCK connect/listen/echo, and TCP with large buffers). Built with the
host's gcc (`-static`, the guest has no libc) once per source, compiler and flags, and cached
under ~/.cache/kvmpy/linux-tools; `kvmpy initramfs --tools` puts them into /usr/bin.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .cache import cache_subdir

#: Every tool, by its name in the guest (the source is guest/linux/NAME.c).
TOOLS = ("kvmpy-nc",)
CFLAGS = ("-static", "-s", "-O2", "-Wall", "-std=gnu11")


def tool_source(name: str) -> bytes:
    if name not in TOOLS:
        raise ConfigError(f"no guest tool {name!r} (there are: {', '.join(TOOLS)})")
    return resources.files("kvmpy").joinpath("guest", "linux", f"{name}.c").read_bytes()


def build_tool(name: str, cc: str = "gcc") -> Path:
    """The static binary of guest tool `name`, compiled on first use. Keyed by a hash of the
    source, the compiler and the flags; renamed into place, so concurrent builds never run a
    half-written file."""
    source = tool_source(name)
    compiler = shutil.which(cc)
    if compiler is None:
        raise ConfigError(f"building the guest tool {name} needs {cc!r}: install gcc")
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, CFLAGS)]))
    out_dir = cache_subdir("linux-tools")
    binary = out_dir / f"{name}-{key.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_bytes(source)
        exe = Path(tmp) / "out"
        try:
            r = subprocess.run([compiler, *CFLAGS, "-o", str(exe), str(src)],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"could not run {compiler} to build {name}: {e}") from None
        if r.returncode != 0:
            detail = " / ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
            raise ConfigError(
                f"{compiler} failed to build the guest tool {name} (a static libc is needed: "
                f"libc6-dev): {detail}"
            )
        os.replace(exe, binary)
    return binary


def tool_additions() -> list:
    """Every tool as an initramfs addition at /usr/bin/NAME."""
    from .initramfs import Addition

    return [Addition(build_tool(name), f"usr/bin/{name}") for name in TOOLS]

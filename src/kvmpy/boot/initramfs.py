"""A busybox initramfs: a newc cpio archive (the format the kernel's initramfs unpacker reads,
Documentation/driver-api/early-userspace/buffer-format.rst) with busybox-static from the
distribution, its applet links, /dev/console and an /init script.

Uncompressed by default: on a software KVM host the kernel's inflate runs as emulated ring-0
code, while an uncompressed 2 MiB archive unpacks in ~8 s there (LINUX-ON-THIS-HOST.md).
The archive is reproducible: fixed inode numbers, mtime 0, files in the order given.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError
from .cache import cache_subdir

#: What the default /init prints once user space runs: the VMM's "init reached" milestone.
INIT_MARKER = "kvmpy-init: ready"

DEFAULT_INIT = f"""#!/bin/sh
# kvmpy's default /init: mount the pseudo file systems, then a shell on the console.
# Applets are called through busybox until /proc is mounted: without applet links its shell
# finds them through /proc/self/exe.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${{TERM:-linux}}
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname kvmpy
echo "{INIT_MARKER}"
# setsid + cttyhack give the shell the console as its controlling terminal (job control, ^C).
setsid cttyhack sh -l
# The shell ended (exit or ^D): power the machine off.
poweroff -f
"""

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
#: Refuse to build archives larger than this (the guest has to hold it twice while unpacking).
MAX_ARCHIVE = 1 << 30


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc ("070701") cpio archive in memory."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self._names: set[str] = set()
        self._finished = False

    def _entry(
        self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple = (0, 0)
    ) -> None:
        if self._finished:
            raise ValueError("the archive is already finished")
        name = _guest_name(name)
        if name in self._names:
            raise ConfigError(f"the initramfs already has /{name}")
        self._names.add(name)
        if len(self._out) + len(data) > MAX_ARCHIVE:
            raise ConfigError(f"the initramfs would be larger than {MAX_ARCHIVE >> 20} MiB")
        self._header(name, mode, len(data), nlink, rdev)
        self._out += data
        self._out += bytes(_pad4(len(data)))

    def _header(self, name: str, mode: int, size: int, nlink: int, rdev: tuple) -> None:
        raw_name = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(raw_name), 0]
        self._ino += 1
        hdr = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out += hdr + raw_name
        self._out += bytes(_pad4(len(hdr) + len(raw_name)))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def has(self, name: str) -> bool:
        return _guest_name(name) in self._names

    def ensure_parents(self, name: str) -> None:
        parts = PurePosixPath(_guest_name(name)).parts[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._names:
                self.add_dir(d)

    def finish(self) -> bytes:
        if not self._finished:
            self._header(TRAILER, 0, 0, 1, (0, 0))
            self._finished = True
            # The kernel reads the archive in 512-byte blocks happily; pad like cpio(1) does.
            self._out += bytes(_pad512(len(self._out)))
        return bytes(self._out)


def _pad512(n: int) -> int:
    return (512 - n % 512) % 512


def _guest_name(name: str) -> str:
    p = PurePosixPath("/" + name.strip())
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfigError(f"bad path inside the initramfs: {name!r}")
    return "/".join(parts)


@dataclass(frozen=True)
class Addition:
    host: Path
    guest: str


def parse_addition(spec: str) -> Addition:
    """HOST_PATH:GUEST_PATH (the last ':' separates them, so host paths may contain one)."""
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise ConfigError(f"--add wants HOST_PATH:GUEST_PATH, got {spec!r}")
    path = Path(host)
    if not path.exists():
        raise ConfigError(f"--add {spec}: {host} does not exist")
    _guest_name(guest)
    return Addition(path, guest)


# --- busybox -----------------------------------------------------------------------------------


def busybox_static(package: str = "busybox-static") -> Path:
    """The distribution's statically linked busybox, downloaded with `apt-get download` (no root
    needed) and unpacked with `dpkg-deb -x` into the cache on first use."""
    root = cache_subdir("busybox")
    binary = root / package / "bin" / "busybox"
    if binary.is_file():
        return binary
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"building an initramfs needs a static busybox: '{tool}' is not available to "
                "fetch the distribution's busybox-static; pass --busybox PATH"
            )
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        r = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
        )
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            msg = (r.stderr.strip().splitlines() or ["no package downloaded"])[-1]
            raise ConfigError(
                f"apt-get download {package} failed ({msg}); run 'apt-get update' or pass "
                "--busybox PATH"
            )
        dest = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
        found = dest / "bin" / "busybox"
        if not found.is_file():
            raise ConfigError(f"the {package} package has no /bin/busybox")
        final = root / package
        if final.exists():
            shutil.rmtree(final)
        os.replace(dest, final)
    return binary


def busybox_applets(busybox: Path) -> list[str]:
    """Every applet's install path (`busybox --list-full`: 'bin/sh', 'usr/sbin/chroot', ...).
    The binary is static x86-64, so the host runs it."""
    try:
        r = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30
        )
    except OSError as e:
        raise ConfigError(f"cannot run {busybox} to list its applets: {e.strerror}") from None
    applets = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    if r.returncode != 0 or not applets:
        raise ConfigError(f"{busybox} does not list its applets: is it a busybox binary?")
    return applets


# --- the archive ---------------------------------------------------------------------------------


def build_initramfs(
    *,
    init: str | bytes | None = None,
    additions: list[Addition] = (),  # type: ignore[assignment]
    busybox: Path | None = None,
    compress: bool = False,
    applet_links: bool = True,
) -> bytes:
    """A busybox initramfs as bytes (newc cpio, gzip-compressed only if asked). Without
    `applet_links` only /bin/sh links to busybox (its shell runs every applet by name)."""
    bb = busybox or busybox_static()
    bb_data = Path(bb).read_bytes()
    w = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "root", "etc", "mnt", "var"):  # fmt: skip
        w.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for init's stdin/stdout before devtmpfs is mounted.
    w.add_char_device("dev/console", 5, 1)
    w.add_file("bin/busybox", bb_data, 0o755)
    for applet in busybox_applets(Path(bb)) if applet_links else ["bin/sh"]:
        if applet == "bin/busybox" or w.has(applet):
            continue
        w.ensure_parents(applet)
        w.add_symlink(applet, "/bin/busybox")
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("etc/group", b"root:x:0:\n")
    script = DEFAULT_INIT.encode() if init is None else (
        init.encode() if isinstance(init, str) else bytes(init)
    )  # fmt: skip
    for add in additions:
        _add_host_path(w, add.host, add.guest)
    if not w.has("init"):
        w.add_file("init", script, 0o755)
    data = w.finish()
    return gzip.compress(data, mtime=0) if compress else data


def _add_host_path(w: CpioWriter, host: Path, guest: str) -> None:
    w.ensure_parents(guest)
    try:
        st = host.lstat()
        if stat.S_ISLNK(st.st_mode):
            w.add_symlink(guest, os.readlink(host))
        elif stat.S_ISDIR(st.st_mode):
            if not w.has(guest):
                w.add_dir(guest, stat.S_IMODE(st.st_mode))
            for child in sorted(host.iterdir()):
                _add_host_path(w, child, f"{guest}/{child.name}")
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > MAX_ARCHIVE:
                raise ConfigError(f"{host} is too large for an initramfs")
            w.add_file(guest, host.read_bytes(), stat.S_IMODE(st.st_mode))
        else:
            raise ConfigError(f"{host} is not a file, directory or symlink")
    except OSError as e:
        raise ConfigError(f"cannot read {host}: {e.strerror}") from None


def write_initramfs(path: Path, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None


def default_initramfs() -> Path:
    """kvmpy's default initramfs as a file (built once, cached by its content): what
    `kvmpy boot` uses without --initrd."""
    import hashlib

    data = build_initramfs()
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = cache_subdir("initramfs") / f"default-{digest}.cpio"
    if not path.is_file():
        from .cache import write_atomically

        write_atomically(path, data)
    return path

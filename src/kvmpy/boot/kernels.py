"""Guest kernels: the distribution's cloud kernel, or kvmpy's minimal microVM kernel built from
the distribution's kernel source. Both end up in the cache (~/.cache/kvmpy/kernels) as a bzImage
and the ELF vmlinux inside it (what a software KVM host boots).

    kvmpy kernel fetch debian     # apt-get download linux-image-*-cloud-amd64-unsigned
    kvmpy kernel build            # linux-source-6.1 + configs/microvm-x86_64.config
    kvmpy kernel list             # what the cache holds
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .cache import kernels_dir, write_atomically
from .linux import extract_vmlinux, parse_bzimage, read_kernel_file, vmlinux_cache_path

log = logging.getLogger(__name__)

MICROVM_CONFIG = "microvm-x86_64.config"
DEBIAN_META_PACKAGE = "linux-image-cloud-amd64"
SOURCE_PACKAGE = "linux-source-6.1"
BUILD_PACKAGES = (SOURCE_PACKAGE, "flex", "bison", "libelf-dev", "bc", "make", "gcc")


@dataclass(frozen=True)
class KernelFiles:
    name: str
    bzimage: Path
    vmlinux: Path
    version: str
    build_seconds: float | None = None
    #: The build reused an object tree (a config change recompiles only what it touched).
    incremental: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bzimage"], d["vmlinux"] = str(self.bzimage), str(self.vmlinux)
        return d


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise ConfigError(f"{what} needs '{cmd[0]}', which is not installed") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"{what} failed: {' / '.join(tail) or f'exit status {r.returncode}'}")
    return r


def _finish(
    name: str, dest: Path, bzimage_data: bytes, version: str, seconds=None, incremental=False
) -> KernelFiles:
    """Store the bzImage and its vmlinux side by side under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    bz = parse_bzimage(bzimage_data, name)
    vm = extract_vmlinux(bz, bzimage_data)
    bz_path, vm_path = dest / "bzImage", dest / "vmlinux"
    write_atomically(bz_path, bzimage_data)
    # The vmlinux is already in the content-hash cache: link it rather than keep 50 MB twice.
    try:
        tmp = vm_path.with_name(".vmlinux.link")
        tmp.unlink(missing_ok=True)
        os.link(vmlinux_cache_path(bzimage_data), tmp)
        os.replace(tmp, vm_path)
    except OSError:
        write_atomically(vm_path, vm.data)
    files = KernelFiles(
        name, bz_path, vm_path, version or bz.header.kernel_version, seconds, incremental
    )
    write_atomically(dest / "kernel.json", _json(files.to_dict()))
    return files


def _json(d: dict) -> bytes:
    import json

    return (json.dumps(d, indent=2) + "\n").encode()


# --- the distribution's cloud kernel --------------------------------------------------------------


def debian_package(package: str | None = None) -> str:
    """The package to fetch: the one the distribution's cloud meta-package depends on (its
    current cloud kernel), in its -unsigned flavour (same kernel, no signature wrapper)."""
    if package:
        return package
    r = _run(["apt-cache", "depends", DEBIAN_META_PACKAGE], "apt-cache depends")
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", r.stdout)
    if not m:
        raise ConfigError(
            f"apt-cache knows no {DEBIAN_META_PACKAGE}: run 'apt-get update' (as root), or name "
            "a package with --package"
        )
    return m.group(1) + "-unsigned"


def fetch_debian(package: str | None = None, force: bool = False) -> KernelFiles:
    pkg = debian_package(package)
    dest = kernels_dir() / "debian" / pkg
    meta = dest / "kernel.json"
    if meta.is_file() and not force and (dest / "vmlinux").is_file():
        return _load_meta(meta)
    with tempfile.TemporaryDirectory(dir=kernels_dir()) as tmp:
        _run(["apt-get", "download", pkg], f"apt-get download {pkg}", cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise ConfigError(f"apt-get download {pkg} produced no package")
        _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], "dpkg-deb -x")
        images = sorted((Path(tmp) / "x" / "boot").glob("vmlinuz-*"))
        if not images:
            raise ConfigError(f"{pkg} has no /boot/vmlinuz-*")
        data = read_kernel_file(images[0])
        return _finish(images[0].name, dest, data, images[0].name.removeprefix("vmlinuz-"))


def _load_meta(path: Path) -> KernelFiles:
    import json

    d = json.loads(path.read_text())
    return KernelFiles(
        d["name"], Path(d["bzimage"]), Path(d["vmlinux"]), d["version"], d.get("build_seconds"),
        bool(d.get("incremental", False)),
    )  # fmt: skip


# --- the minimal microVM kernel -------------------------------------------------------------------


def microvm_config_text() -> str:
    return resources.files("kvmpy.boot").joinpath("configs", MICROVM_CONFIG).read_text()


def check_config(fragment: str, config: str) -> list[str]:
    """Every `CONFIG_X=v` and `# CONFIG_X is not set` of the fragment that the final .config
    does not honour (Kconfig drops an option whose dependencies are missing without a word)."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            have[m.group(1)] = m.group(2)
            continue
        m = re.match(r"# (CONFIG_\w+) is not set", line)
        if m:
            have[m.group(1)] = "n"
    problems = []
    for line in fragment.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m and have.get(m.group(1)) != m.group(2):
            problems.append(f"{m.group(1)}={m.group(2)} became {have.get(m.group(1), 'unset')}")
        m = re.match(r"# (CONFIG_\w+) is not set", line)
        if m and have.get(m.group(1), "n") != "n":
            problems.append(f"{m.group(1)} should be off but is {have[m.group(1)]}")
    return problems


def _source_version() -> str | None:
    try:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status} ${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        return None
    if r.returncode != 0 or "install ok installed" not in r.stdout:
        return None
    return r.stdout.split()[-1]


def ensure_build_tools() -> str:
    """The installed linux-source version; installs the build packages with apt-get when
    missing and we are root, else says what to install."""
    version = _source_version()
    missing = [t for t in ("flex", "bison", "bc", "make", "gcc") if shutil.which(t) is None]
    if not Path("/usr/include/libelf.h").exists() and not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")
    if version and not missing:
        return version
    if os.geteuid() != 0:
        raise ConfigError(
            f"building the kernel needs {', '.join(BUILD_PACKAGES)}: install them "
            "(apt-get install as root) and run again"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", *BUILD_PACKAGES], env=env)
    if r.returncode != 0:
        _run(["apt-get", "update", "-q"], "apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-q", *BUILD_PACKAGES], "apt-get install", env=env)
    version = _source_version()
    if not version:
        raise ConfigError(f"{SOURCE_PACKAGE} did not install")
    return version


def build_microvm(
    jobs: int | None = None, force: bool = False, config: str | None = None, progress=None
) -> KernelFiles:
    """Build kvmpy's minimal kernel (cached by source version and config); returns its files
    with the build time. `progress(line)` sees make's output."""
    version = ensure_build_tools()
    fragment = config if config is not None else microvm_config_text()
    key = hashlib.sha256(f"{version}\n{fragment}".encode()).hexdigest()[:12]
    dest = kernels_dir() / f"microvm-{key}"
    meta = dest / "kernel.json"
    if meta.is_file() and not force and (dest / "vmlinux").is_file():
        return _load_meta(meta)
    build = kernels_dir() / "build"
    build.mkdir(exist_ok=True)
    src = build / f"{SOURCE_PACKAGE}-{version}"
    if not (src / "Makefile").is_file():
        tarball = Path(f"/usr/src/{SOURCE_PACKAGE}.tar.xz")
        with tempfile.TemporaryDirectory(dir=build) as tmp:
            if shutil.which("tar"):
                # tar(1) with xz is ~10x faster than tarfile on the 1.3 GB tree.
                _run(["tar", "-xJf", str(tarball), "-C", tmp], f"unpacking {tarball}")
            else:
                with tarfile.open(tarball) as tf:
                    tf.extractall(tmp, filter="tar")
            os.replace(Path(tmp) / SOURCE_PACKAGE, src)
    # One object tree per source version: a config change then rebuilds only what depends on
    # the options that changed (Kbuild tracks them per file), not all ~1000 objects.
    out = build / f"out-{version}"
    out.mkdir(exist_ok=True)
    frag_path = out / "kvmpy.config"
    frag_path.write_text(fragment)
    make = ["make", "-C", str(src), f"O={out}"]
    _run([*make, "allnoconfig", f"KCONFIG_ALLCONFIG={frag_path}"], "make allnoconfig")
    problems = check_config(fragment, (out / ".config").read_text())
    if problems:
        raise ConfigError(
            "the kernel config lost options kvmpy needs (Kconfig dropped them): "
            + "; ".join(problems)
        )
    jobs = jobs or os.cpu_count() or 1
    incremental = (out / "vmlinux").exists()
    t0 = time.monotonic()
    # nice: a kernel build takes minutes of both cores on our shared machines.
    proc = subprocess.Popen(
        ["nice", "-n", "10", *make, f"-j{jobs}", "bzImage"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so it can be stopped as a whole
    )
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if progress is not None:
                progress(line.rstrip())
    except BaseException:
        # Ctrl-C or an error here: make and its compilers would otherwise run on, orphaned.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    if proc.wait() != 0:
        raise ConfigError("the kernel build failed:\n" + "\n".join(tail))
    seconds = time.monotonic() - t0
    data = read_kernel_file(out / "arch" / "x86" / "boot" / "bzImage")
    files = _finish("microvm", dest, data, version, seconds, incremental)
    shutil.copy(out / ".config", dest / "config")
    return files


def cached_kernels() -> list[KernelFiles]:
    root = kernels_dir()
    return [_load_meta(p) for p in sorted(root.glob("**/kernel.json")) if "build" not in p.parts]


def microvm_dir(config: str | None = None) -> Path | None:
    """Where `build_microvm` keeps the kernel of this config (None when the source package is
    not installed, so the key is unknown)."""
    version = _source_version()
    if not version:
        return None
    fragment = config if config is not None else microvm_config_text()
    key = hashlib.sha256(f"{version}\n{fragment}".encode()).hexdigest()[:12]
    return kernels_dir() / f"microvm-{key}"


def find_kernel(name: str) -> KernelFiles | None:
    """A cached kernel by name, for `kvmpy boot microvm` / `kvmpy boot debian`: the microVM
    kernel of kvmpy's current config (else the newest one built), or the newest Debian one."""
    kernels = cached_kernels()
    if name == "microvm":
        current = microvm_dir()
        for k in kernels:
            if current is not None and k.vmlinux.parent == current:
                return k
        built = [k for k in kernels if k.vmlinux.parent.name.startswith("microvm-")]
    elif name == "debian":
        built = [k for k in kernels if k.vmlinux.parent.parent.name == "debian"]
    else:
        return None
    built = [k for k in built if k.vmlinux.is_file()]
    return max(built, key=lambda k: k.vmlinux.stat().st_mtime) if built else None


def ensure_microvm(progress=None) -> KernelFiles:
    """The microVM kernel of kvmpy's current config, built if it is not cached yet (what the
    test suite boots: a few minutes once per machine)."""
    current = microvm_dir()
    if current is not None and (current / "kernel.json").is_file():
        return _load_meta(current / "kernel.json")
    return build_microvm(progress=progress)

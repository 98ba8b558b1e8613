"""Bundled example guests: `kvmpy examples` lists them, `kvmpy run NAME` builds and runs one.

An example is one file in kvmpy/guest/examples/ whose header comment says what it is:

    kvmpy-example: one line for `kvmpy examples`
    kvmpy-modes: real protected paged32 long long-user   (the modes it is meant for)
    kvmpy-default-mode: long-user                         (optional)
    kvmpy-format: raw                                     (optional: a raw image, not an ELF)
    kvmpy-vcpus: 4                                        (optional: default vCPU count)

Builds are cached under $KVMPY_CACHE_DIR (default $XDG_CACHE_HOME/kvmpy, ~/.cache/kvmpy),
keyed by a hash of the example, the SDK files, the mode and the compiler, so an edit to any of
them rebuilds and nothing else does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..arch.x86.modes import Mode
from ..errors import BuildError
from . import CRT0, INCLUDE_DIR, LINKER_TEMPLATE, RUNTIME, SDK_DIR, _run, build, gcc, gcc_version

EXAMPLES_DIR = SDK_DIR / "examples"
_TAG = re.compile(r"kvmpy-([a-z-]+):\s*(.+?)\s*$")


def cache_dir() -> Path:
    base = os.environ.get("KVMPY_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "kvmpy"


@dataclass(frozen=True)
class Example:
    name: str
    source: Path
    description: str
    modes: tuple[Mode, ...]
    default_mode: Mode
    raw: bool = False
    #: vCPUs `kvmpy run NAME` gives it when --vcpus is not given.
    vcpus: int = 1

    def build(self, mode: Mode | None = None) -> Path:
        """The built image for `mode` (default: the example's), from the cache if current."""
        mode = mode or self.default_mode
        key = self._key(mode)
        suffix = "bin" if self.raw else "elf"
        out = cache_dir() / "examples" / f"{self.name}-{mode.value}-{key}.{suffix}"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.raw:
            _build_raw(self.source, out)
        else:
            build([self.source], out, mode)
        return out

    def _key(self, mode: Mode) -> str:
        h = hashlib.sha256()
        for path in (
            self.source,
            CRT0,
            RUNTIME,
            LINKER_TEMPLATE,
            *sorted(INCLUDE_DIR.rglob("*.h")),
        ):
            h.update(path.read_bytes())
        h.update(mode.value.encode())
        h.update(_compiler_id().encode())
        return h.hexdigest()[:16]


@functools.cache
def _compiler_id() -> str:
    return gcc_version()


def _tags(head: str) -> dict[str, str]:
    """`kvmpy-name: value` tags from a header comment; a value continues on the following
    comment lines until a blank one or the next tag."""
    tags: dict[str, str] = {}
    current = None
    for raw in head.splitlines():
        line = raw.strip().lstrip("/*").strip()
        m = _TAG.match(line)
        if m:
            current = m.group(1)
            tags[current] = m.group(2)
        elif current and line and not line.startswith("*/") and not raw.strip().startswith("*/"):
            tags[current] += " " + line
        else:
            current = None
    return tags


def _parse(path: Path) -> Example | None:
    head = path.read_text(errors="replace")[:2000]
    tags = _tags(head)
    if "example" not in tags:
        return None
    try:
        modes = tuple(Mode(m) for m in tags.get("modes", "long-user").split())
        default = (
            Mode(tags["default-mode"])
            if "default-mode" in tags
            else (Mode.LONG_USER if Mode.LONG_USER in modes else modes[0])
        )
    except ValueError as e:
        raise BuildError(f"{path.name}: bad kvmpy-modes tag ({e})") from None
    return Example(
        name=path.stem,
        source=path,
        description=tags["example"],
        modes=modes,
        default_mode=default,
        raw=tags.get("format") == "raw",
        vcpus=int(tags.get("vcpus", "1")),
    )


def examples() -> list[Example]:
    out = []
    for path in sorted(EXAMPLES_DIR.iterdir()):
        if path.suffix in (".c", ".S"):
            ex = _parse(path)
            if ex is not None:
                out.append(ex)
    return out


def find_example(name: str) -> Example | None:
    for ex in examples():
        if ex.name == name:
            return ex
    return None


def _build_raw(source: Path, out: Path) -> Path:
    """Assemble a raw example: linked at 0 with entry 0 (the raw-image convention)."""
    cc = gcc()
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise BuildError("objcopy (binutils) is needed to build raw examples")
    with tempfile.TemporaryDirectory(prefix="kvmpy-raw-") as tmp:
        elf = Path(tmp) / "raw.elf"
        _run(
            [
                cc,
                "-m32",
                "-nostdlib",
                "-static",
                "-no-pie",
                "-fno-pic",
                f"-I{INCLUDE_DIR}",
                "-Wl,-m,elf_i386",
                "-Wl,--build-id=none",
                "-Wl,-Ttext=0",
                "-Wl,-e,0",
                "-Wl,--no-warn-rwx-segments",
                "-o",
                str(elf),
                str(source),
            ],  # fmt: skip
            f"assembling {source.name}",
        )
        fd, staging = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        _run([objcopy, "-O", "binary", "-j", ".text", str(elf), staging], "objcopy")
        os.replace(staging, out)
    return out

"""The guest SDK: compile freestanding C (and assembly) guests for any kvmpy CPU mode.

    kvmpy build hello.c -o hello.elf --mode long-user

The SDK itself (include/kvmpy.h, crt0.S, the runtime in lib/kvmpy.c, the linker script
template) lives in `kvmpy/guest/` and ships with the package. The same C source builds for
every mode: the mode picks gcc's code size (-m16 for real mode, -m32 for protected and paged32,
-m64 for long and long-user), the load address and the ELF class, and is recorded in the ELF
(`.note.kvmpy`) so `kvmpy run` starts the image in the mode it was built for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..arch.x86.modes import Mode
from ..errors import BuildError

SDK_DIR = Path(__file__).resolve().parent.parent / "guest"
INCLUDE_DIR = SDK_DIR / "include"
CRT0 = SDK_DIR / "crt0.S"
RUNTIME = SDK_DIR / "lib" / "kvmpy.c"
LINKER_TEMPLATE = SDK_DIR / "link.ld.in"


@dataclass(frozen=True)
class Target:
    """How to build for a mode."""

    cflags: tuple[str, ...]
    ld_format: str
    ld_emulation: str
    base: int
    #: Highest address the image may reach (real-mode code and data live in segment 0).
    limit: int | None = None


TARGETS: dict[int, Target] = {
    16: Target(
        ("-m16", "-march=i386", "-DKVMPY_CODE16"), "elf32-i386", "elf_i386", 0x1000, 0x10000
    ),
    32: Target(("-m32", "-march=i686"), "elf32-i386", "elf_i386", 0x100000),
    # No red zone: at CPL0 an interrupt pushes its frame on the current stack.
    64: Target(("-m64", "-mno-red-zone", "-mcmodel=small"), "elf64-x86-64", "elf_x86_64", 0x100000),
}

COMMON_CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    # No endbr64/endbr32: KVM's instruction emulator (all ring-0 code on software KVM hosts)
    # does not know every newer instruction; plain code runs everywhere.
    "-fcf-protection=none",
    # No SSE/x87 in generated code: ring-0 code is emulated on some hosts and the emulator
    # lacks many vector instructions; guests that want floating point can opt back in.
    "-mgeneral-regs-only",
    "-Wall",
    "-Wextra",
)


def gcc() -> str:
    path = shutil.which(os.environ.get("KVMPY_CC", "gcc"))
    if path is None:
        raise BuildError(
            "gcc is needed to build guests (install it, e.g. 'apt install gcc'), "
            "or set KVMPY_CC to a compatible compiler"
        )
    return path


def gcc_version() -> str:
    try:
        return subprocess.run(
            [gcc(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def target(mode: Mode) -> Target:
    return TARGETS[mode.bits]


def compile_flags(mode: Mode, extra: Sequence[str] = ()) -> list[str]:
    t = target(mode)
    return [
        *COMMON_CFLAGS,
        *t.cflags,
        f'-DKVMPY_MODE="{mode.value}"',
        f"-DKVMPY_MODE_{mode.name}=1",
        f"-I{INCLUDE_DIR}",
        *extra,
    ]


def _run(cmd: list[str], what: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip()
        raise BuildError(f"{what} failed:\n{detail}")


def build(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    mode: Mode | str = Mode.LONG_USER,
    *,
    cflags: Sequence[str] = (),
    runtime: bool = True,
) -> Path:
    """Compile and link `sources` (C or .S) with the SDK into the ELF `output`."""
    mode = Mode.parse(mode) if isinstance(mode, str) else mode
    if not sources:
        raise BuildError("no source files given")
    srcs = [Path(s) for s in sources]
    for s in srcs:
        if not s.is_file():
            raise BuildError(f"{s}: no such source file")
        if s.suffix not in (".c", ".S", ".s"):
            raise BuildError(f"{s}: only .c, .S and .s sources can be built")
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():  # checked before compiling; no directories are made for it
        raise BuildError(f"cannot write {output}: {parent} is not a directory")
    if output.is_dir():
        raise BuildError(f"cannot write {output}: it is a directory")
    cc = gcc()
    t = target(mode)
    flags = compile_flags(mode, cflags)
    with tempfile.TemporaryDirectory(prefix="kvmpy-build-") as tmp:
        tmpdir = Path(tmp)
        objs = []
        units = [CRT0, *([RUNTIME] if runtime else []), *srcs]
        for i, src in enumerate(units):
            obj = tmpdir / f"{i}-{src.stem}.o"
            _run([cc, *flags, "-c", str(src), "-o", str(obj)], f"compiling {src.name}")
            objs.append(str(obj))
        script = tmpdir / "link.ld"
        script.write_text(
            LINKER_TEMPLATE.read_text()
            .replace("@FORMAT@", t.ld_format)
            .replace("@BASE@", hex(t.base))
        )
        tmp_out = tmpdir / "out.elf"
        _run(
            [
                cc,
                *t.cflags[:1],
                "-nostdlib",
                "-static",
                "-no-pie",
                f"-Wl,-m,{t.ld_emulation}",
                "-Wl,--build-id=none",
                "-Wl,-z,noexecstack",
                # One RWX segment is what a flat guest image is; no need to warn about it.
                "-Wl,--no-warn-rwx-segments",
                f"-Wl,-T,{script}",
                "-o",
                str(tmp_out),
                *objs,
            ],  # fmt: skip
            "linking",
        )
        if t.limit is not None:
            _check_limit(tmp_out, t.limit, mode)
        # Write beside the target and rename: a concurrent reader never sees half a file.
        try:
            fd, staging = tempfile.mkstemp(dir=parent, prefix=f".{output.name}.")
            os.close(fd)
            shutil.copyfile(tmp_out, staging)
            os.replace(staging, output)
        except OSError as e:
            raise BuildError(f"cannot write {output}: {e.strerror or e}") from None
    return output


def _check_limit(elf_path: Path, limit: int, mode: Mode) -> None:
    from ..loader import load_file

    image = load_file(elf_path)
    end = max(s.end for s in image.segments)
    if end > limit:
        raise BuildError(
            f"the {mode}-mode image ends at {end:#x}, above {limit:#x}: real-mode code and data "
            "must fit in the first 64 KiB (segment 0)"
        )


def objcopy_raw(elf: Path, output: Path) -> Path:
    """The loadable bytes of `elf` as a raw image (for guests that use the raw convention)."""
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise BuildError("objcopy (binutils) is needed to make raw images")
    _run([objcopy, "-O", "binary", str(elf), str(output)], "objcopy")
    return output

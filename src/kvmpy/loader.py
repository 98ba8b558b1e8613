"""Guest images: raw binaries and ELF32/ELF64 executables (pyelftools).

A raw image loads at guest-physical 0 with entry 0 unless told otherwise (the kvm-hello-world
convention). An ELF image loads by its PT_LOAD program headers at their physical addresses and
starts at its entry point; kvmpy SDK images also carry a `.note.kvmpy` note naming the CPU mode
they were built for. Whatever is wrong with an image is reported as one BadImage sentence.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from .arch.x86.modes import Mode
from .errors import BadImage
from .memory import GuestMemory, format_size

ELF_MAGIC = b"\x7fELF"
EM_386, EM_X86_64 = 3, 62
NOTE_NAME = "kvmpy"
NOTE_TYPE_MODE = 1
# Refuse to read more than this from an image file: a guest never needs more, and a wrong
# path (a disk image, /dev/zero) should fail fast instead of filling host memory.
MAX_IMAGE_FILE = 1 << 32


@dataclass(frozen=True)
class ImageSegment:
    gpa: int
    data: bytes
    memsz: int
    executable: bool = True

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class Image:
    kind: str  # "raw", "elf32" or "elf64"
    segments: tuple[ImageSegment, ...]
    entry: int
    mode_hint: Mode | None = None
    path: str | None = None
    symbols: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def bits(self) -> int | None:
        return {"elf32": 32, "elf64": 64}.get(self.kind)

    def ranges(self) -> list[tuple[int, int]]:
        return [(s.gpa, s.end) for s in self.segments if s.memsz]

    @property
    def size(self) -> int:
        return sum(s.memsz for s in self.segments)

    def check_mode(self, mode: Mode) -> None:
        """An ELF's class must match the mode's code size (16-bit code comes as ELF32)."""
        bits = self.bits
        if bits is None:
            return
        want = 64 if mode.bits == 64 else 32
        if bits != want:
            hint = "long or long-user" if bits == 64 else "real, protected or paged32"
            raise BadImage(
                f"{self.name} is a {bits}-bit ELF and cannot run in {mode} mode "
                f"({mode.bits}-bit); use --mode {hint}"
            )

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else f"{self.kind} image"

    def place(self, memory: GuestMemory) -> None:
        """Copy the segments into guest RAM (zero-filling .bss); every byte must be RAM."""
        for seg in self.segments:
            if not seg.memsz:
                continue
            if not memory.is_ram(seg.gpa, seg.memsz):
                # --load-addr moves raw images only: an ELF loads where it was linked.
                where = (
                    "or load it lower with --load-addr"
                    if self.kind == "raw"
                    else "(an ELF loads at the addresses it was linked for)"
                )
                raise BadImage(
                    f"{self.name} needs guest memory [{seg.gpa:#x}, {seg.end:#x}) but the guest "
                    f"has {format_size(memory.size)} of RAM; give it more with --mem {where}"
                )
            memory.write(seg.gpa, seg.data)
            if seg.memsz > len(seg.data):
                memory.fill(seg.gpa + len(seg.data), seg.memsz - len(seg.data))


def load_file(
    path: str | os.PathLike, load_addr: int | None = None, entry: int | None = None
) -> Image:
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise BadImage(f"{p} is a directory, not a guest image")
        if not p.is_file():
            raise BadImage(f"{p} is not a regular file")
        if size > MAX_IMAGE_FILE:
            raise BadImage(f"{p} is {format_size(size)}, larger than any guest image kvmpy loads")
        data = p.read_bytes()
    except FileNotFoundError:
        raise BadImage(
            f"{p}: no such file (and not the name of a bundled example; see 'kvmpy examples')"
        ) from None
    except IsADirectoryError:
        raise BadImage(f"{p} is a directory, not a guest image") from None
    except PermissionError:
        raise BadImage(f"{p}: permission denied") from None
    except OSError as e:
        # ENOTDIR (a file used as a directory), ELOOP, ENAMETOOLONG, EIO...
        raise BadImage(f"{p}: cannot read the image: {e.strerror or e}") from None
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise BadImage("--load-addr applies to raw images; an ELF loads at its own addresses")
        img = load_elf(data, str(p))
        if entry is not None:
            if not any(seg.gpa <= entry < seg.end for seg in img.segments):
                raise BadImage(f"entry point {entry:#x} is outside every loadable segment of {p}")
            img = Image(img.kind, img.segments, entry, img.mode_hint, img.path, img.symbols)
        return img
    what = not_an_image(data, p)
    if what is not None:
        raise BadImage(what)
    return load_raw(data, load_addr or 0, entry, str(p))


def not_an_image(data: bytes, path: Path) -> str | None:
    """What to tell the user about a file that is clearly not a raw guest image (a raw image
    can be any bytes, so only the unmistakable cases): a Linux kernel, text or source code."""
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS" and data[0x1FE:0x200] == b"\x55\xaa":
        return (
            f"{path} is a Linux kernel image (bzImage); kvmpy loads raw and ELF guests and does "
            "not implement the Linux boot protocol yet (boot an uncompressed vmlinux ELF on a "
            "VT-x/AMD-V host, or see 'kvmpy examples')"
        )
    sample = data[:4096]
    if sample and b"\0" not in sample:
        try:
            text = sample.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and sum(c.isprintable() or c in "\n\r\t" for c in text) == len(text):
            if path.suffix in (".c", ".S", ".s", ".h", ".cc", ".cpp"):
                return (
                    f"{path} is source code, not a guest image: build it first, e.g. 'kvmpy "
                    f"build {path} -o {path.stem}.elf', then run the ELF"
                )
            return (
                f"{path} is a text file, not a guest image (a raw binary or an ELF); C or "
                "assembly sources are built with 'kvmpy build'"
            )
    return None


def load_raw(
    data: bytes, load_addr: int = 0, entry: int | None = None, path: str | None = None
) -> Image:
    if not data:
        raise BadImage(f"{path or 'the image'} is empty")
    if load_addr < 0 or (entry is not None and entry < 0):
        raise BadImage("load address and entry point must be non-negative")
    seg = ImageSegment(load_addr, bytes(data), len(data))
    if entry is not None and not seg.gpa <= entry < seg.end:
        raise BadImage(
            f"entry point {entry:#x} is outside the image, which loads at "
            f"[{seg.gpa:#x}, {seg.end:#x})"
        )
    return Image("raw", (seg,), load_addr if entry is None else entry, None, path)


def load_elf(data: bytes, path: str | None = None) -> Image:
    name = os.path.basename(path) if path else "the ELF image"
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf["e_machine"]
        cls = elf.elfclass
        if machine not in ("EM_386", "EM_X86_64"):
            raise BadImage(f"{name} is an ELF for {machine}, not x86")
        if elf["e_type"] != "ET_EXEC":
            raise BadImage(
                f"{name} is {elf['e_type']}, not an executable (ET_EXEC); link it with "
                "'kvmpy build' or a static, non-PIE linker script"
            )
        segments = []
        for ph in elf.iter_segments():
            if ph["p_type"] != "PT_LOAD":
                continue
            filesz, memsz, off = ph["p_filesz"], ph["p_memsz"], ph["p_offset"]
            if filesz > memsz:
                raise BadImage(f"{name}: a segment's file size exceeds its memory size")
            if filesz and off + filesz > len(data):  # no file bytes: p_offset is unused
                raise BadImage(f"{name} is truncated: a segment extends past the end of the file")
            if memsz == 0:
                continue
            gpa = ph["p_paddr"]
            segments.append(
                ImageSegment(
                    gpa, data[off : off + filesz], memsz, bool(ph["p_flags"] & P_FLAGS.PF_X)
                )
            )
        if not segments:
            raise BadImage(f"{name} has no loadable segments")
        segments.sort(key=lambda s: s.gpa)
        for a, b in zip(segments, segments[1:], strict=False):
            if b.gpa < a.end:
                raise BadImage(
                    f"{name} has overlapping segments at [{a.gpa:#x}, {a.end:#x}) and "
                    f"[{b.gpa:#x}, {b.end:#x})"
                )
        entry = elf["e_entry"]
        if not any(s.gpa <= entry < s.end for s in segments):
            raise BadImage(f"{name}'s entry point {entry:#x} is outside every loadable segment")
        mode = _mode_note(elf, name)
        symbols = _symbols(elf)
    except BadImage:
        raise
    except ELFError as e:
        raise BadImage(f"{name} is not a valid ELF file ({e})") from None
    except Exception as e:
        # pyelftools reports malformed input through many exception types (struct.error,
        # construct errors, ValueError, UnicodeDecodeError...); all mean the same to a user.
        raise BadImage(f"{name} is not a valid ELF file ({type(e).__name__}: {e})") from None
    kind = "elf64" if cls == 64 else "elf32"
    if (cls == 64) != (machine == "EM_X86_64"):
        raise BadImage(f"{name}: ELF class {cls} does not match machine {machine}")
    return Image(kind, tuple(segments), entry, mode, path, symbols)


def _mode_note(elf: ELFFile, name: str) -> Mode | None:
    """The mode in a `.note.kvmpy` note. Parsed by hand: pyelftools names note types after the
    GNU ones (type 1 reads as NT_GNU_ABI_TAG), and the format is three words and two strings."""
    section = elf.get_section_by_name(".note.kvmpy")
    if section is None:
        return None
    data = section.data()
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        note_name = data[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        if note_name == NOTE_NAME.encode() and ntype == NOTE_TYPE_MODE:
            text = desc.rstrip(b"\0").decode("ascii", "replace").strip()
            try:
                return Mode(text)
            except ValueError:
                raise BadImage(f"{name} names an unknown kvmpy mode {text!r}") from None
    return None


def _symbols(elf: ELFFile) -> dict[str, int]:
    table = elf.get_section_by_name(".symtab")
    if table is None:
        return {}
    out = {}
    for sym in table.iter_symbols():
        if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
            out[sym.name] = sym["st_value"]
    return out


def patch_symbol(src: str | Path, dst: str | Path, symbol: str, data: bytes) -> Path:
    """A copy of the ELF `src` at `dst` whose initialized bytes at `symbol` are `data`: how
    an example's built-in parameters are set for a guest another process runs."""
    raw = bytearray(Path(src).read_bytes())
    try:
        elf = ELFFile(io.BytesIO(bytes(raw)))
        symtab = elf.get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name(symbol) if symtab else None
        if not syms:
            raise BadImage(f"{src} has no {symbol} symbol")
        addr = syms[0]["st_value"]
        for seg in elf.iter_segments():
            if (
                seg["p_type"] == "PT_LOAD"
                and seg["p_vaddr"] <= addr
                and addr + len(data) <= seg["p_vaddr"] + seg["p_filesz"]
            ):
                offset = seg["p_offset"] + addr - seg["p_vaddr"]
                break
        else:
            raise BadImage(f"{symbol} in {src} has no file bytes")
    except ELFError as e:
        raise BadImage(f"{src} is not a usable ELF file: {e}") from None
    raw[offset : offset + len(data)] = data
    out = Path(dst)
    out.write_bytes(bytes(raw))
    return out

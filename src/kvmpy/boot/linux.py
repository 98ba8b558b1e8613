"""The Linux x86 boot protocol: bzImage and ELF vmlinux kernels, the zero page, the 64-bit entry.

Reference: the kernel's Documentation/x86/boot.rst ("THE LINUX/x86 BOOT PROTOCOL") and
Documentation/x86/zero-page.rst. kvmpy uses the 64-bit boot protocol only: the VMM loads the
kernel, builds `boot_params` (the "zero page") with the e820 memory map, command line and
initrd, and enters the kernel in long mode with identity page tables and a flat GDT, rsi
pointing at the zero page. No real-mode setup code and no BIOS run.

Two kinds of kernel file:

* a **bzImage**: 512-byte boot sector + real-mode setup code (`setup_sects` sectors) + the
  protected-mode part, which is a small decompressor plus the compressed ELF vmlinux (the
  payload, located by `payload_offset`/`payload_length`, since protocol 2.08). Its 64-bit entry
  is 0x200 bytes into the protected-mode part (needs XLF_KERNEL_64).
* an **ELF vmlinux**: loaded by its PT_LOAD program headers at their physical addresses and
  entered at `e_entry` (`startup_64`). On a software KVM host this is the only usable way: a
  bzImage's decompressor would run as emulated ring-0 code (not done after 75 s on our hosts,
  LINUX-ON-THIS-HOST.md), so kvmpy decompresses the payload itself (`extract_vmlinux`, cached by
  content hash).

Every parser here takes untrusted files: a malformed or truncated image is one `BadImage`
sentence, never a traceback (tests/test_boot_linux.py fuzzes them), and decompression is bounded
by the size the kernel build appends to its payload.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..arch.x86 import gdt as G
from ..arch.x86.paging import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PTE_RW,
    MapRange,
    TableAllocator,
    build_identity_map_64,
)
from ..errors import BadImage, ConfigError
from ..kvm import structs as S
from ..memory import PAGE_SIZE, GuestMemory, format_size
from .cache import kernels_dir, write_atomically

# --- the setup header (boot.rst, "THE REAL-MODE KERNEL HEADER") --------------------------------

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
#: The 64-bit boot protocol needs xloadflags (2.12); payload_offset/length came in 2.08.
MIN_PROTOCOL = 0x020C

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
XLF_5LEVEL = 0x20

#: type_of_loader 0xFF: "undefined" boot loader, what every VMM that is not in the kernel's
#: list uses (Firecracker, kvmtool, cloud-hypervisor).
LOADER_TYPE_UNDEFINED = 0xFF

# Offsets of the header fields in the bzImage (and, identically, in boot_params).
_FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}

# boot_params fields outside the setup header (zero-page.rst).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
ZERO_PAGE_SIZE = 4096

# e820 types
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4

#: Without a header that says otherwise (a bare vmlinux): x86's COMMAND_LINE_SIZE since 2.6.x.
DEFAULT_CMDLINE_SIZE = 2048
#: Protocol < 2.03 kernels could not take an initrd above this; later headers say their own.
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF

#: Refuse kernel files and decompressed kernels larger than this: Debian's vmlinux is 53 MB,
#: allyesconfig ones a few hundred; a wrong path or a decompression bomb should fail fast.
MAX_KERNEL_FILE = 512 << 20
MAX_VMLINUX = 1 << 30

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class SetupHeader:
    """The parsed setup header of a bzImage, and its raw bytes (copied into the zero page)."""

    raw: bytes  # bytes SETUP_HEADER_OFFSET .. end of header
    setup_sects: int
    syssize: int
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    kernel_version: str = ""

    @property
    def setup_size(self) -> int:
        """Bytes of boot sector + real-mode setup (the protected-mode kernel follows them)."""
        return ((self.setup_sects or 4) + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def supports_64bit_entry(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


def _u(data: bytes, name: str) -> int:
    off, fmt = _FIELDS[name]
    return struct.unpack_from("<" + fmt, data, off)[0]


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and struct.unpack_from("<I", data, 0x202)[0] == HDRS_MAGIC


def parse_setup_header(data: bytes, name: str = "the kernel") -> SetupHeader:
    """Parse and check a bzImage's setup header; BadImage says what is wrong."""
    if len(data) < 0x206 or _u(data, "header") != HDRS_MAGIC:
        if data[:4] == ELF_MAGIC:
            raise BadImage(f"{name} is an ELF file, not a bzImage")
        raise BadImage(f"{name} is not a Linux kernel (no bzImage 'HdrS' header, not an ELF)")
    if len(data) < 0x264:  # every header field kvmpy reads (found by test_fuzz_bzimage)
        raise BadImage(f"{name} is truncated inside its setup header")
    version = _u(data, "version")
    if version < MIN_PROTOCOL:
        raise BadImage(
            f"{name} uses boot protocol {version >> 8}.{version & 0xFF:02d}; kvmpy's 64-bit "
            "entry needs 2.12 or later (Linux 3.8+)"
        )
    # The header ends where the 2-byte jump at 0x200 lands.
    hdr_end = 0x202 + data[0x201]
    if hdr_end < 0x264:
        raise BadImage(f"{name}'s setup header is too short ({hdr_end - 0x1F1} bytes)")
    if len(data) < hdr_end:
        raise BadImage(f"{name} is truncated inside its setup header")
    if _u(data, "boot_flag") != BOOT_FLAG:
        raise BadImage(f"{name} has no 0xAA55 boot flag: not a bzImage")
    kver = ""
    kv_off = _u(data, "kernel_version")
    if kv_off and 0x200 + kv_off < len(data):
        raw_ver = data[0x200 + kv_off : 0x200 + kv_off + 128].split(b"\0", 1)[0]
        kver = raw_ver.decode("ascii", "replace")
    hdr = SetupHeader(
        raw=bytes(data[SETUP_HEADER_OFFSET:hdr_end]),
        setup_sects=_u(data, "setup_sects"),
        syssize=_u(data, "syssize"),
        version=version,
        loadflags=_u(data, "loadflags"),
        code32_start=_u(data, "code32_start"),
        initrd_addr_max=_u(data, "initrd_addr_max"),
        kernel_alignment=_u(data, "kernel_alignment"),
        relocatable=bool(_u(data, "relocatable_kernel")),
        xloadflags=_u(data, "xloadflags"),
        cmdline_size=_u(data, "cmdline_size"),
        payload_offset=_u(data, "payload_offset"),
        payload_length=_u(data, "payload_length"),
        pref_address=_u(data, "pref_address"),
        init_size=_u(data, "init_size"),
        kernel_version=kver,
    )
    if not hdr.loadflags & LOADED_HIGH:
        raise BadImage(f"{name} is a zImage (loads below 1 MiB); kvmpy boots bzImages only")
    if not hdr.supports_64bit_entry:
        raise BadImage(f"{name} has no 64-bit entry point (XLF_KERNEL_64): not an x86-64 kernel")
    if hdr.setup_size >= len(data):
        raise BadImage(f"{name} is truncated: it ends inside its real-mode setup code")
    pm_size = len(data) - hdr.setup_size
    if hdr.syssize * 16 > pm_size:
        raise BadImage(
            f"{name} is truncated: its header promises {hdr.syssize * 16} bytes of "
            f"protected-mode kernel, the file has {pm_size}"
        )
    if hdr.payload_length == 0 or hdr.payload_offset + hdr.payload_length > pm_size:
        raise BadImage(f"{name} is truncated: its compressed kernel runs past the end of the file")
    if hdr.init_size == 0:
        raise BadImage(f"{name}'s setup header has no init_size")
    if hdr.kernel_alignment & (hdr.kernel_alignment - 1):
        raise BadImage(f"{name}'s kernel_alignment {hdr.kernel_alignment:#x} is not a power of 2")
    return hdr


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader
    protected_mode: bytes  # the part loaded at the kernel's load address
    name: str

    @property
    def payload(self) -> bytes:
        h = self.header
        return self.protected_mode[h.payload_offset : h.payload_offset + h.payload_length]

    @property
    def compression(self) -> str:
        return detect_compression(self.payload)


def parse_bzimage(data: bytes, name: str = "the kernel") -> BzImage:
    hdr = parse_setup_header(data, name)
    return BzImage(hdr, bytes(data[hdr.setup_size :]), name)


# --- payload decompression ----------------------------------------------------------------------

# First bytes of each compressor's output, as the kernel's build writes them.
_MAGICS = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (ELF_MAGIC, "none"),
]
COMPRESSIONS = tuple(name for _, name in _MAGICS)


def detect_compression(payload: bytes) -> str:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise BadImage(
        f"the kernel's payload is in an unknown format (starts with {payload[:6].hex()}); "
        f"kvmpy knows {', '.join(COMPRESSIONS)}"
    )


def decompress_payload(payload: bytes, limit: int = MAX_VMLINUX) -> bytes:
    """Decompress a bzImage payload. Its last four bytes are the decompressed size, little
    endian (mkpiggy reads them: gzip's ISIZE, or what Kbuild's `size_append` adds after the
    other formats): output must match it exactly, and no more than min(it, `limit`) bytes are
    ever produced."""
    kind = detect_compression(payload)
    if kind == "none":
        return bytes(payload)
    if len(payload) < 8:
        raise BadImage("the kernel's compressed payload is truncated")
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if expected == 0 or expected > limit:
        raise BadImage(
            f"the kernel's payload claims {format_size(expected)} decompressed, more than the "
            f"{format_size(limit)} kvmpy allows"
            if expected
            else "the kernel's payload has no decompressed size"
        )
    # gzip's own trailer ends with ISIZE, which is all Kbuild relies on for it (no extra size
    # is appended to gzip payloads since Linux 5.x); every other format gets `size_append`.
    body = payload if kind == "gzip" else payload[:-4]
    try:
        out = _DECOMPRESSORS[kind](body, expected + 1)
    except BadImage:
        raise
    except MemoryError:
        raise BadImage(f"the kernel's {kind} payload needs more memory than is available") from None
    except Exception as e:
        # zlib.error, lzma.LZMAError, OSError from bz2, zstd.ZstdError, lz4's RuntimeError...
        raise BadImage(
            f"the kernel's {kind} payload is corrupt or truncated ({type(e).__name__}: {e})"
        ) from None
    if len(out) != expected:
        raise BadImage(
            f"the kernel's {kind} payload decompressed to {len(out)} bytes, not the "
            f"{expected} its trailer promises (corrupt or truncated)"
        )
    return out


def _gzip(body: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(body, limit)
    if not d.eof:
        raise BadImage("the kernel's gzip payload is truncated")
    return out


def _bzip2(body: bytes, limit: int) -> bytes:
    d = bz2.BZ2Decompressor()
    out = d.decompress(body, limit)
    if not d.eof:
        raise BadImage("the kernel's bzip2 payload is truncated")
    return out


def _lzma_format(fmt: int) -> Callable[[bytes, int], bytes]:
    def run(body: bytes, limit: int) -> bytes:
        # memlimit: a hostile header may ask for a huge dictionary.
        d = lzma.LZMADecompressor(fmt, memlimit=1 << 30)
        out = d.decompress(body, limit)
        if not d.eof and len(out) < limit:
            raise BadImage("the kernel's lzma/xz payload is truncated")
        return out

    return run


def _zstd(body: bytes, limit: int) -> bytes:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=False)
    with reader:
        return reader.read(limit)


_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20


def _lz4(body: bytes, limit: int) -> bytes:
    """The LZ4 *legacy* frame (`lz4 -l`, what the kernel's build uses): the magic, then blocks
    of a u32 compressed size and data, each decompressing to at most 8 MiB."""
    import lz4.block

    out = bytearray()
    pos = 0
    n = len(body)
    while pos < n:
        if pos + 4 > n:
            raise BadImage("the kernel's lz4 payload is truncated")
        size = struct.unpack_from("<I", body, pos)[0]
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:
            continue
        if size == 0 or pos + size > n:
            raise BadImage("the kernel's lz4 payload is truncated")
        room = min(_LZ4_LEGACY_BLOCK, limit - len(out))
        if room <= 0:
            break
        out += lz4.block.decompress(body[pos : pos + size], uncompressed_size=room)
        pos += size
    return bytes(out)


_LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
_LZOP_F_ADLER32_D = 0x1
_LZOP_F_ADLER32_C = 0x2
_LZOP_F_H_FILTER = 0x800
_LZOP_F_CRC32_D = 0x100
_LZOP_F_CRC32_C = 0x200


def _lzo(body: bytes, limit: int) -> bytes:
    """The lzop container the kernel's build writes (and lib/decompress_unlzo.c reads), with
    LZO1X blocks decompressed by `lzallright`."""
    try:
        import lzallright
    except ImportError:
        raise BadImage(
            "this kernel's payload is LZO-compressed and the 'lzallright' package is not "
            "installed (pip install lzallright), or boot its ELF vmlinux"
        ) from None
    r = _Reader(body, "lzo")
    r.expect(_LZOP_MAGIC)
    version = r.u16be()
    r.u16be()  # library version
    if version >= 0x0940:
        r.u16be()  # version needed to extract
    r.u8()  # method
    if version >= 0x0940:
        r.u8()  # level
    flags = r.u32be()
    if flags & _LZOP_F_H_FILTER:
        r.u32be()
    r.u32be()  # mode
    r.u32be()  # mtime low
    if version >= 0x0940:
        r.u32be()  # mtime high
    r.take(r.u8())  # file name
    r.u32be()  # header checksum
    out = bytearray()
    while True:
        dst_len = r.u32be()
        if dst_len == 0:
            break
        src_len = r.u32be()
        if dst_len > 64 << 20 or src_len > dst_len or len(out) + dst_len > limit:
            raise BadImage("the kernel's lzo payload has an impossible block size")
        if flags & (_LZOP_F_ADLER32_D | _LZOP_F_CRC32_D):
            r.u32be()
        if src_len < dst_len and flags & (_LZOP_F_ADLER32_C | _LZOP_F_CRC32_C):
            r.u32be()
        block = r.take(src_len)
        if src_len == dst_len:
            out += block
            continue
        data = lzallright.LZOCompressor.decompress(block, output_size_hint=dst_len)
        if len(data) != dst_len:
            raise BadImage("the kernel's lzo payload is corrupt (a block has the wrong size)")
        out += data
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadImage(f"the kernel's {self.what} payload is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def expect(self, magic: bytes) -> None:
        if self.take(len(magic)) != magic:
            raise BadImage(f"the kernel's {self.what} payload has a bad magic number")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16be(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32be(self) -> int:
        return struct.unpack(">I", self.take(4))[0]


_DECOMPRESSORS = {
    "gzip": _gzip,
    "bzip2": _bzip2,
    "xz": _lzma_format(lzma.FORMAT_XZ),
    "lzma": _lzma_format(lzma.FORMAT_ALONE),
    "lzo": _lzo,
    "lz4": _lz4,
    "zstd": _zstd,
}


# --- ELF vmlinux -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSegment:
    gpa: int
    offset: int  # into the ELF file
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class Vmlinux:
    """An x86-64 ELF kernel: where its PT_LOAD segments go (physical addresses) and its entry."""

    data: bytes = field(repr=False)
    segments: tuple[KernelSegment, ...]
    entry: int
    name: str

    @property
    def start(self) -> int:
        return self.segments[0].gpa

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def parse_vmlinux(data: bytes, name: str = "the kernel") -> Vmlinux:
    """Read an x86-64 vmlinux's program headers. Parsed with struct rather than pyelftools:
    only the ELF header and program headers matter, and the kernel's 50k-symbol table is
    never touched."""
    if data[:4] != ELF_MAGIC:
        raise BadImage(f"{name} is not an ELF file")
    if len(data) < 64:
        raise BadImage(f"{name} is truncated inside its ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_class != 2 or ei_data != 1:
        raise BadImage(f"{name} is not a 64-bit little-endian ELF: not an x86-64 vmlinux")
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize, e_phnum) = (
        struct.unpack_from("<HHIQQQIHHH", data, 16)
    )
    if e_machine != 62:
        raise BadImage(f"{name} is an ELF for machine {e_machine}, not x86-64")
    if e_type != 2:
        raise BadImage(f"{name} is not an executable ELF (type {e_type}): not a vmlinux")
    if e_phentsize != 56 or e_phnum == 0 or e_phnum > 64:
        raise BadImage(f"{name} has no usable program headers")
    if e_phoff + e_phnum * 56 > len(data):
        raise BadImage(f"{name} is truncated inside its program headers")
    segments = []
    for i in range(e_phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * 56
        )
        if p_type != 1 or p_memsz == 0:  # PT_LOAD
            continue
        if p_filesz > p_memsz:
            raise BadImage(f"{name}: a segment's file size exceeds its memory size")
        if p_filesz and p_offset + p_filesz > len(data):
            raise BadImage(f"{name} is truncated: a segment extends past the end of the file")
        if p_memsz > MAX_VMLINUX or p_paddr + p_memsz > 1 << 46:
            raise BadImage(f"{name} has a segment at an impossible address or size")
        segments.append(KernelSegment(p_paddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise BadImage(f"{name} has no loadable segments")
    segments.sort(key=lambda s: s.gpa)
    for a, b in zip(segments, segments[1:], strict=False):
        if b.gpa < a.end:
            raise BadImage(f"{name} has overlapping segments at {a.gpa:#x} and {b.gpa:#x}")
    if sum(s.memsz for s in segments) > MAX_VMLINUX:
        raise BadImage(f"{name} is larger than any kernel kvmpy loads")
    # `e_entry` is startup_64's physical address (vmlinux.lds: ENTRY(phys_startup_64)).
    if not any(s.gpa <= e_entry < s.end for s in segments):
        raise BadImage(f"{name}'s entry point {e_entry:#x} is outside its loadable segments")
    return Vmlinux(bytes(data), tuple(segments), e_entry, name)


# --- kernel files ------------------------------------------------------------------------------


def read_kernel_file(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        if p.is_dir():
            raise BadImage(f"{p} is a directory, not a kernel")
        size = p.stat().st_size
        if size > MAX_KERNEL_FILE:
            raise BadImage(f"{p} is {format_size(size)}: larger than any kernel kvmpy loads")
        return p.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"{p}: no such file") from None
    except PermissionError:
        raise BadImage(f"{p}: permission denied") from None
    except OSError as e:
        raise BadImage(f"{p}: cannot read it: {e.strerror or e}") from None


@dataclass(frozen=True)
class Kernel:
    """A kernel ready to load: an ELF vmlinux, plus the setup header of the bzImage it came
    from (None for a bare vmlinux), or a bzImage booted through its own decompressor."""

    vmlinux: Vmlinux | None
    bzimage: BzImage | None
    path: str

    @property
    def header(self) -> SetupHeader | None:
        return self.bzimage.header if self.bzimage else None

    @property
    def cmdline_size(self) -> int:
        h = self.header
        return h.cmdline_size if h else DEFAULT_CMDLINE_SIZE

    @property
    def initrd_addr_max(self) -> int:
        h = self.header
        return h.initrd_addr_max if h else 0x7FFF_FFFF


def vmlinux_cache_path(bzimage_data: bytes) -> Path:
    digest = hashlib.sha256(bzimage_data).hexdigest()[:24]
    return kernels_dir() / f"vmlinux-{digest}"


def extract_vmlinux(bz: BzImage, data: bytes) -> Vmlinux:
    """The ELF vmlinux inside a bzImage, decompressed once and cached by the bzImage's hash
    (Debian's 53 MB vmlinux takes ~1 s to inflate from LZ4; a cache hit reads it back)."""
    path = vmlinux_cache_path(data)
    try:
        cached = path.read_bytes()
    except OSError:
        cached = None
    if cached is not None:
        try:
            return parse_vmlinux(cached, bz.name)
        except BadImage:
            pass  # a damaged cache entry: extract again
    raw = decompress_payload(bz.payload)
    vm = parse_vmlinux(raw, f"the vmlinux inside {bz.name}")
    try:
        write_atomically(path, raw)
    except OSError:
        pass  # a read-only cache only costs time
    return vm


def open_kernel(path: str | os.PathLike, *, use_vmlinux: bool = True) -> Kernel:
    """Read a bzImage or an ELF vmlinux. With `use_vmlinux` (what a software KVM host needs), a
    bzImage's payload is decompressed by kvmpy (cached) and its vmlinux booted directly; without
    it, the bzImage is booted through its own decompressor."""
    data = read_kernel_file(path)
    name = os.path.basename(str(path))
    if data[:4] == ELF_MAGIC:
        return Kernel(parse_vmlinux(data, name), None, str(path))
    bz = parse_bzimage(data, name)
    if use_vmlinux:
        return Kernel(extract_vmlinux(bz, data), bz, str(path))
    return Kernel(None, bz, str(path))


# --- the e820 map ------------------------------------------------------------------------------

#: Low-memory layout, as Firecracker and kvmtool use it. Below 1 MiB: the legacy BIOS areas.
EBDA_START = 0x9FC00  # the MP table lives here (Linux scans the last KiB of base memory)
BIOS_AREA = (0xA0000, 0x100000)  # VGA hole + option ROMs + BIOS (ACPI tables at 0xE0000)
HIMEM_START = 0x100000

GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PAGE_TABLES_ADDR = 0x9000
PAGE_TABLES_END = 0x10000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # room reserved at CMDLINE_ADDR

APIC_BASE_DEFAULT = 0xFEE0_0000
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11

# Boot GDT selectors the 64-bit protocol requires (__BOOT_CS, __BOOT_DS).
BOOT_CS = 0x10
BOOT_DS = 0x18


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(
    ram: Sequence[tuple[int, int]],
    reserved: Sequence[tuple[int, int, int]] = (),
) -> list[E820Entry]:
    """The e820 table for guest RAM regions `ram` [(gpa, size)] (kvmpy's layout: RAM below
    3 GiB, the MMIO hole, the rest from 4 GiB). Below 1 MiB the EBDA (MP table) and the BIOS
    area are carved out as reserved; `reserved` [(start, end, type)] adds more (ACPI tables are
    E820_ACPI). Holes are left out, as firmware does for the MMIO window."""
    carve = [(EBDA_START, BIOS_AREA[1], E820_RESERVED), *reserved]
    carve.sort()
    out: list[E820Entry] = []
    for gpa, size in sorted(ram):
        pieces = [(gpa, gpa + size)]
        for start, end, _t in carve:
            nxt = []
            for lo, hi in pieces:
                if end <= lo or start >= hi:
                    nxt.append((lo, hi))
                    continue
                if lo < start:
                    nxt.append((lo, start))
                if end < hi:
                    nxt.append((end, hi))
            pieces = nxt
        out += [E820Entry(lo, hi - lo, E820_RAM) for lo, hi in pieces if hi > lo]
    out += [E820Entry(s, e - s, t) for s, e, t in carve if e > s]
    out.sort(key=lambda e: e.addr)
    if len(out) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(f"the memory map has {len(out)} entries; the zero page holds 128")
    return out


# --- placement ---------------------------------------------------------------------------------


def place_initrd(
    size: int,
    memory_ranges: Sequence[tuple[int, int]],
    kernel_end: int,
    initrd_addr_max: int,
) -> int:
    """Where the initrd goes: as high as possible (so it never collides with the kernel's
    decompression and early allocations, as GRUB and QEMU do), page-aligned, in RAM below
    4 GiB, above the kernel, and ending at or below `initrd_addr_max` (inclusive limit)."""
    limit = min(initrd_addr_max + 1, 1 << 32)
    best = None
    for gpa, rsize in memory_ranges:
        hi = min(gpa + rsize, limit)
        lo = max(gpa, kernel_end)
        addr = (hi - size) & ~(PAGE_SIZE - 1)
        if size <= hi - lo and addr >= lo and (best is None or addr > best):
            best = addr
    if best is None:
        room = max(
            (min(g + s, limit) - max(g, kernel_end) for g, s in memory_ranges),
            default=0,
        )
        raise ConfigError(
            f"the initrd ({format_size(size)}) does not fit in guest memory: "
            f"{format_size(max(room, 0))} are free between the kernel and "
            f"{min(limit, max(g + s for g, s in memory_ranges)):#x}; give the guest more memory"
        )
    return best


# --- zero page -----------------------------------------------------------------------------


def build_zero_page(
    header: SetupHeader | None,
    *,
    cmdline_addr: int,
    cmdline_len: int,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None = None,
    acpi_rsdp: int | None = None,
) -> bytes:
    """boot_params for the 64-bit entry: the bzImage's setup header (or a minimal one for a
    bare vmlinux, as Firecracker writes), with kvmpy's loader type, command line, initrd and
    memory map."""
    zp = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        zp[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
    else:
        struct.pack_into("<H", zp, 0x1FE, BOOT_FLAG)
        struct.pack_into("<I", zp, 0x202, HDRS_MAGIC)
        struct.pack_into("<H", zp, 0x206, MIN_PROTOCOL)
        struct.pack_into("<I", zp, 0x230, 0x0100_0000)  # kernel_alignment
        struct.pack_into("<I", zp, 0x238, DEFAULT_CMDLINE_SIZE)
        zp[0x211] = LOADED_HIGH
    zp[0x210] = LOADER_TYPE_UNDEFINED
    # No KASLR from kvmpy (it passes no entropy), and keep the kernel's messages.
    zp[0x211] = (zp[0x211] | LOADED_HIGH) & ~(KASLR_FLAG | QUIET_FLAG)
    struct.pack_into("<H", zp, 0x1FA, 0xFFFF)  # vid_mode: "normal"
    struct.pack_into("<I", zp, 0x228, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", zp, 0x218, addr & 0xFFFF_FFFF, size & 0xFFFF_FFFF)
        struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, size >> 32)
    if acpi_rsdp is not None:
        struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, acpi_rsdp)
    zp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, e.addr, e.size, e.type)
    del cmdline_len  # the kernel finds the NUL; kept in the signature for the caller's check
    return bytes(zp)


# --- entry state -------------------------------------------------------------------------------


@dataclass
class LinuxBoot:
    """What `load_linux` did: where things are, and the vCPU state to enter the kernel with."""

    regs: S.kvm_regs
    sregs: S.kvm_sregs
    entry: int
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None
    cmdline: bytes
    e820: list[E820Entry]
    zero_page: int = ZERO_PAGE_ADDR


def entry_state_64(memory: GuestMemory, entry: int, zero_page: int) -> tuple:
    """Long mode, CPL0, paging on with a 2 MiB-page identity map of the low 4 GiB (the kernel,
    zero page, command line and initrd all sit there), the boot GDT with __BOOT_CS/__BOOT_DS,
    interrupts off, rsi = the zero page (boot.rst, "64-bit BOOT PROTOCOL")."""
    code = G.flat_code64(BOOT_CS, 0)
    data = G.flat_data(BOOT_DS, 0)
    gdt = bytes(16) + code.descriptor() + data.descriptor()
    memory.write(GDT_ADDR, gdt)
    memory.write(IDT_ADDR, bytes(8))
    alloc = TableAllocator(PAGE_TABLES_ADDR, PAGE_TABLES_END, memory.write)
    cr3 = build_identity_map_64([MapRange(0, 1 << 32, PTE_RW)], alloc, memory.write_u64)
    sregs = S.kvm_sregs()
    sregs.cs = code.to_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data.to_kvm())
    sregs.tr = G.Segment(0, 0, 0xFFFF, G.TYPE_TSS_BUSY, s=0).to_kvm()
    sregs.ldt = G.Segment(0, 0, 0xFFFF, 0x2, s=0).to_kvm()
    sregs.gdt = S.kvm_dtable(base=GDT_ADDR, limit=len(gdt) - 1)
    sregs.idt = S.kvm_dtable(base=IDT_ADDR, limit=7)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    # KVM_SET_SREGS also sets the APIC base MSR: a zero here disables the LAPIC, and Linux then
    # reads its xAPIC registers as all-ones through userspace MMIO ("boot CPU (#255)", "no APIC").
    sregs.apic_base = APIC_BASE_DEFAULT | APIC_BASE_ENABLE | APIC_BASE_BSP
    regs = S.kvm_regs(rflags=0x2, rip=entry, rsi=zero_page, rsp=BOOT_STACK_TOP, rbp=BOOT_STACK_TOP)
    return regs, sregs


def check_cmdline(cmdline: str | bytes, limit: int) -> bytes:
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise ConfigError("the kernel command line must not contain a NUL byte")
    if len(raw) > min(limit, CMDLINE_MAX - 1):
        raise ConfigError(
            f"the kernel command line is {len(raw)} bytes; this kernel accepts at most "
            f"{min(limit, CMDLINE_MAX - 1)} (its cmdline_size)"
        )
    return raw


def load_linux(
    memory: GuestMemory,
    kernel: Kernel,
    *,
    cmdline: str | bytes = "",
    initrd: bytes | None = None,
    ram: Sequence[tuple[int, int]] | None = None,
    reserved: Sequence[tuple[int, int, int]] = (),
    acpi_rsdp: int | None = None,
) -> LinuxBoot:
    """Put `kernel`, the command line, the initrd and the zero page into guest RAM and return the
    64-bit entry state. `ram` is the RAM layout [(gpa, size)] (default: `memory`'s regions);
    `reserved` [(start, end, e820 type)] are extra e820 entries (MP/ACPI tables the caller
    wrote). Errors are ConfigError (does not fit) or BadImage (kernel file)."""
    ram = [(r.gpa, r.size) for r in memory] if ram is None else list(ram)
    raw_cmdline = check_cmdline(cmdline, kernel.cmdline_size)
    if not memory.is_ram(0, HIMEM_START):
        raise ConfigError("a Linux guest needs RAM from address 0 (at least 1 MiB of it)")
    if kernel.vmlinux is not None:
        vm = kernel.vmlinux
        for seg in vm.segments:
            if not memory.is_ram(seg.gpa, seg.memsz):
                raise ConfigError(
                    f"{vm.name} needs guest memory up to {seg.end:#x} but the guest has "
                    f"{format_size(memory.size)}; give it more memory"
                )
            if seg.gpa < HIMEM_START:
                raise BadImage(f"{vm.name} has a segment below 1 MiB ({seg.gpa:#x})")
        for seg in vm.segments:
            view = memory.view(seg.gpa, seg.memsz)
            view[: seg.filesz] = vm.data[seg.offset : seg.offset + seg.filesz]
            view[seg.filesz :] = bytes(seg.memsz - seg.filesz)
        entry = vm.entry
        kernel_range = (vm.start, vm.end)
        # The kernel's own bss/brk is inside memsz; init_size, when known, also covers what
        # early boot uses past it.
        if kernel.header is not None:
            kernel_range = (vm.start, max(vm.end, vm.start + kernel.header.init_size))
    else:
        bz = kernel.bzimage
        assert bz is not None
        h = bz.header
        # Load where the kernel wants to run, so its decompressor need not move itself first.
        load = h.pref_address if h.relocatable else max(h.code32_start, HIMEM_START)
        if h.relocatable and h.kernel_alignment:
            load = (load + h.kernel_alignment - 1) & ~(h.kernel_alignment - 1)
        need = max(len(bz.protected_mode), h.init_size)
        if not memory.is_ram(load, need):
            raise ConfigError(
                f"{bz.name} needs guest memory [{load:#x}, {load + need:#x}) but the guest has "
                f"{format_size(memory.size)}; give it more memory"
            )
        memory.write(load, bz.protected_mode)
        entry = load + 0x200
        kernel_range = (load, load + need)
    initrd_range = None
    if initrd is not None:
        # Above the kernel's whole footprint, in RAM below the hole.
        low = [(g, s) for g, s in ram if g < 1 << 32]
        addr = place_initrd(len(initrd), low, kernel_range[1], kernel.initrd_addr_max)
        memory.write(addr, initrd)
        initrd_range = (addr, addr + len(initrd))
    memory.write(CMDLINE_ADDR, raw_cmdline + b"\0")
    e820 = e820_map(ram, reserved)
    zp = build_zero_page(
        kernel.header,
        cmdline_addr=CMDLINE_ADDR,
        cmdline_len=len(raw_cmdline),
        e820=e820,
        initrd=(initrd_range[0], len(initrd)) if initrd_range and initrd is not None else None,
        acpi_rsdp=acpi_rsdp,
    )
    memory.write(ZERO_PAGE_ADDR, zp)
    regs, sregs = entry_state_64(memory, entry, ZERO_PAGE_ADDR)
    return LinuxBoot(regs, sregs, entry, kernel_range, initrd_range, raw_cmdline, e820)

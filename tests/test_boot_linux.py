"""The Linux boot protocol: setup-header parsing, payload decompression, the vmlinux loader, the
zero page, e820 and placement, with synthetic kernels (and fuzzed ones)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.boot import linux as L
from kvmpy.errors import BadImage, ConfigError
from kvmpy.memory import GuestMemory

# --- synthetic kernels ------------------------------------------------------------------------


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, machine: int = 62) -> bytes:
    """A minimal ELF64 executable: segments are (paddr, data, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    phdrs = b""
    blobs = b""
    for paddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 5, off, 0xFFFF_FFFF_8000_0000 + paddr, paddr, len(data), memsz, 4096
        )
        blobs += data
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0
    )
    return hdr + phdrs + blobs


KERNEL_TEXT = b"\x90" * 64 + b"\xf4" * 64
VMLINUX = make_elf([(0x100_0000, KERNEL_TEXT, 0x2000), (0x100_4000, b"data", 0x1000)], 0x100_0000)


def compress(kind: str, raw: bytes) -> bytes:
    """Compress as the kernel build does: gzip as is, the others with an appended u32 size."""
    if kind == "gzip":
        return gzip.compress(raw)  # ISIZE ends the stream; Kbuild appends nothing more
    if kind == "bzip2":
        body = bz2.compress(raw)
    elif kind == "xz":
        body = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "lzma":
        body = lzma.compress(raw, format=lzma.FORMAT_ALONE)
    elif kind == "zstd":
        import zstandard

        body = zstandard.ZstdCompressor().compress(raw)
    elif kind == "lz4":
        import lz4.block

        body = struct.pack("<I", 0x184C2102)
        for i in range(0, len(raw), 8 << 20):
            block = lz4.block.compress(raw[i : i + (8 << 20)], store_size=False)
            body += struct.pack("<I", len(block)) + block
    elif kind == "lzo":
        import lzallright

        block = lzallright.LZOCompressor().compress(raw)
        body = b"\x89LZO\x00\r\n\x1a\n" + struct.pack(">HHHBBI", 0x1030, 0x2080, 0x0940, 1, 5, 0)
        body += struct.pack(">III", 0, 0, 0) + b"\x00" + struct.pack(">I", 0)
        body += struct.pack(">II", len(raw), len(block)) + block + struct.pack(">I", 0)
    else:
        raise AssertionError(kind)
    return body + struct.pack("<I", len(raw))


def make_bzimage(
    payload: bytes,
    *,
    version: int = 0x020F,
    setup_sects: int = 1,
    xloadflags: int = L.XLF_KERNEL_64,
    loadflags: int = L.LOADED_HIGH,
    cmdline_size: int = 2047,
    init_size: int = 0x40_0000,
    relocatable: bool = True,
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    payload_offset = 0x100
    pm = bytearray(payload_offset) + payload
    pm += bytes(-len(pm) % 16)

    def put(name, value):
        off, fmt = L._FIELDS[name]
        struct.pack_into("<" + fmt, setup, off, value)

    put("setup_sects", setup_sects)
    put("syssize", len(pm) // 16)
    put("boot_flag", L.BOOT_FLAG)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # header ends at 0x26C
    put("header", L.HDRS_MAGIC)
    put("version", version)
    put("loadflags", loadflags)
    put("code32_start", 0x100000)
    put("initrd_addr_max", 0x7FFF_FFFF)
    put("kernel_alignment", 0x20_0000)
    put("relocatable_kernel", int(relocatable))
    put("xloadflags", xloadflags)
    put("cmdline_size", cmdline_size)
    put("payload_offset", payload_offset)
    put("payload_length", len(payload))
    put("pref_address", 0x100_0000)
    put("init_size", init_size)
    return bytes(setup + pm)


# --- header -------------------------------------------------------------------------------------


def test_parse_setup_header():
    bz = L.parse_bzimage(make_bzimage(compress("gzip", VMLINUX)), "k")
    h = bz.header
    assert h.version == 0x020F and h.version_text == "2.15"
    assert h.setup_size == 1024
    assert h.supports_64bit_entry and h.relocatable
    assert h.cmdline_size == 2047 and h.initrd_addr_max == 0x7FFF_FFFF
    assert h.pref_address == 0x100_0000 and h.init_size == 0x40_0000
    assert bz.compression == "gzip"
    assert h.raw[: 0x202 - 0x1F1] == make_bzimage(compress("gzip", VMLINUX))[0x1F1:0x202]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a Linux kernel"),
        (b"MZ" + bytes(1000), "not a Linux kernel"),
        (VMLINUX, "is an ELF file"),
        (make_bzimage(b"x" * 64, version=0x0204), "boot protocol 2.04"),
        (make_bzimage(b"x" * 64, xloadflags=0), "no 64-bit entry"),
        (make_bzimage(b"x" * 64, loadflags=0), "zImage"),
        (make_bzimage(compress("gzip", VMLINUX))[:1100], "truncated"),
        (make_bzimage(compress("gzip", VMLINUX))[:0x230], "truncated inside its setup header"),
    ],
)
def test_bad_headers(data, message):
    with pytest.raises(BadImage, match=message):
        L.parse_bzimage(data, "k")


# --- decompression ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "lzma", "zstd", "lz4", "lzo"])
def test_decompress_every_format(kind):
    raw = VMLINUX * 50
    payload = compress(kind, raw)
    assert L.detect_compression(payload) == kind
    assert L.decompress_payload(payload) == raw


def test_decompress_checks_the_appended_size():
    payload = compress("xz", VMLINUX)
    wrong = payload[:-4] + struct.pack("<I", len(VMLINUX) + 1)
    with pytest.raises(BadImage, match="not the"):
        L.decompress_payload(wrong)
    # A gzip stream followed by an extra size (older kernels' size_append) still works.
    assert L.decompress_payload(gzip.compress(VMLINUX) + struct.pack("<I", len(VMLINUX))) == VMLINUX


def test_decompress_refuses_a_bomb():
    payload = gzip.compress(bytes(1 << 20))
    with pytest.raises(BadImage, match="more than"):
        L.decompress_payload(payload, limit=1 << 16)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "zstd", "lz4", "lzo"])
def test_decompress_truncated(kind):
    payload = compress(kind, VMLINUX * 20)
    cut = payload[: len(payload) // 2] + struct.pack("<I", len(VMLINUX) * 20)
    with pytest.raises(BadImage):
        L.decompress_payload(cut)


def test_unknown_compression():
    with pytest.raises(BadImage, match="unknown format"):
        L.detect_compression(b"\x00\x01\x02\x03\x04\x05")


# --- vmlinux --------------------------------------------------------------------------------------


def test_parse_vmlinux():
    vm = L.parse_vmlinux(VMLINUX, "vmlinux")
    assert vm.entry == 0x100_0000
    assert [(s.gpa, s.memsz) for s in vm.segments] == [(0x100_0000, 0x2000), (0x100_4000, 0x1000)]
    assert vm.start == 0x100_0000 and vm.end == 0x100_5000


@pytest.mark.parametrize(
    "data, message",
    [
        (make_elf([(0x100_0000, b"x", 16)], 0x100_0000, machine=3), "not x86-64"),
        (make_elf([(0x100_0000, b"x", 16)], 0x200_0000), "entry point"),
        (make_elf([(0x100_0000, b"x" * 32, 16)], 0x100_0000), "file size exceeds"),
        (make_elf([(0x100_0000, b"x", 0x2000), (0x100_1000, b"y", 16)], 0x100_0000), "overlap"),
        (make_elf([(0x100_0000, b"x" * 100, 100)], 0x100_0000)[:-10], "truncated"),
        (VMLINUX[:40], "truncated inside its ELF header"),
        (b"\x7fELF" + bytes([1, 1]) + bytes(100), "not a 64-bit"),
    ],
)
def test_bad_vmlinux(data, message):
    with pytest.raises(BadImage, match=message):
        L.parse_vmlinux(data, "vmlinux")


# --- files and the cache -----------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_open_kernel_extracts_and_caches_the_vmlinux(tmp_path, cache):
    image = make_bzimage(compress("lz4", VMLINUX))
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    k = L.open_kernel(path)
    assert k.vmlinux is not None and k.vmlinux.data == VMLINUX
    assert k.header is not None and k.cmdline_size == 2047
    cached = list((cache / "kernels").glob("vmlinux-*"))
    assert len(cached) == 1 and cached[0].read_bytes() == VMLINUX
    # A damaged cache entry is extracted again, not trusted.
    cached[0].write_bytes(b"junk")
    assert L.open_kernel(path).vmlinux.data == VMLINUX
    k2 = L.open_kernel(path, use_vmlinux=False)
    assert k2.vmlinux is None and k2.bzimage is not None


def test_open_kernel_errors(tmp_path):
    with pytest.raises(BadImage, match="no such file"):
        L.open_kernel(tmp_path / "missing")
    with pytest.raises(BadImage, match="directory"):
        L.open_kernel(tmp_path)
    (tmp_path / "text").write_text("hello")
    with pytest.raises(BadImage, match="not a Linux kernel"):
        L.open_kernel(tmp_path / "text")


# --- e820, placement, zero page ------------------------------------------------------------------


def test_e820_carves_low_memory_and_keeps_the_hole():
    ram = [(0, 3 << 30), (4 << 30, 1 << 30)]
    e = L.e820_map(ram, [(0x9B000, 0x9F000, L.E820_RESERVED)])
    table = [(x.addr, x.end, x.type) for x in e]
    assert table == [
        (0, 0x9B000, L.E820_RAM),
        (0x9B000, 0x9F000, L.E820_RESERVED),
        (0x9F000, 0x9FC00, L.E820_RAM),
        (0x9FC00, 0x100000, L.E820_RESERVED),
        (0x100000, 3 << 30, L.E820_RAM),
        (4 << 30, 5 << 30, L.E820_RAM),
    ]


def test_initrd_goes_high_below_its_limits():
    ram = [(0, 256 << 20)]
    addr = L.place_initrd(0x1234, ram, kernel_end=0x200_0000, initrd_addr_max=0x7FFF_FFFF)
    assert addr % 4096 == 0 and addr + 0x1234 <= 256 << 20 and addr >= (256 << 20) - 0x2000
    addr = L.place_initrd(0x1000, ram, kernel_end=0x200_0000, initrd_addr_max=0x3FF_FFFF)
    assert addr + 0x1000 <= 0x400_0000


def test_initrd_too_large_is_one_clear_error():
    with pytest.raises(ConfigError, match="does not fit in guest memory"):
        L.place_initrd(
            200 << 20, [(0, 128 << 20)], kernel_end=0x200_0000, initrd_addr_max=-1 + (1 << 32)
        )


def test_cmdline_over_the_kernel_limit():
    with pytest.raises(ConfigError, match="at most 10"):
        L.check_cmdline("x" * 11, 10)
    assert L.check_cmdline("console=ttyS0", 2047) == b"console=ttyS0"
    with pytest.raises(ConfigError, match="NUL"):
        L.check_cmdline("a\0b", 100)


def test_zero_page_fields():
    bz = L.parse_bzimage(make_bzimage(compress("gzip", VMLINUX)), "k")
    e820 = L.e820_map([(0, 64 << 20)])
    zp = L.build_zero_page(
        bz.header, cmdline_addr=0x20000, cmdline_len=5, e820=e820, initrd=(0x300_0000, 0x1000)
    )
    assert len(zp) == 4096
    assert zp[0x210] == L.LOADER_TYPE_UNDEFINED
    assert zp[0x211] & L.LOADED_HIGH and not zp[0x211] & L.KASLR_FLAG
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", zp, 0x218) == (0x300_0000, 0x1000)
    assert struct.unpack_from("<I", zp, 0x202)[0] == L.HDRS_MAGIC
    assert zp[L.BP_E820_ENTRIES] == len(e820) == 3
    addr, size, kind = struct.unpack_from("<QQI", zp, L.BP_E820_TABLE + 40)
    assert (addr, size, kind) == (0x100000, (64 << 20) - 0x100000, L.E820_RAM)
    assert zp[L.BP_SENTINEL] == 0


def test_zero_page_for_a_bare_vmlinux():
    zp = L.build_zero_page(None, cmdline_addr=0x20000, cmdline_len=0, e820=[])
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == L.BOOT_FLAG
    assert struct.unpack_from("<I", zp, 0x238)[0] == L.DEFAULT_CMDLINE_SIZE


@pytest.fixture
def memory():
    m = GuestMemory()
    m.add_region(0, 64 << 20)
    yield m
    m.close()


def test_load_linux_vmlinux(memory):
    k = L.Kernel(L.parse_vmlinux(VMLINUX, "vmlinux"), None, "vmlinux")
    lb = L.load_linux(memory, k, cmdline="console=ttyS0", initrd=b"INITRD" * 100)
    assert memory.read(0x100_0000, len(KERNEL_TEXT)) == KERNEL_TEXT
    assert memory.read(0x100_0000 + len(KERNEL_TEXT), 16) == bytes(16)  # bss zeroed
    assert lb.regs.rip == 0x100_0000 and lb.regs.rsi == L.ZERO_PAGE_ADDR
    assert lb.sregs.cs.selector == L.BOOT_CS and lb.sregs.cs.l == 1
    assert lb.sregs.ds.selector == L.BOOT_DS
    assert lb.sregs.efer & 0x500 == 0x500 and lb.sregs.cr0 >> 31
    # KVM_SET_SREGS sets the APIC base too: it must keep the LAPIC enabled at 0xFEE00000.
    assert lb.sregs.apic_base == 0xFEE0_0000 | L.APIC_BASE_ENABLE | L.APIC_BASE_BSP
    assert memory.read(L.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    start, end = lb.initrd_range
    assert memory.read(start, 600) == b"INITRD" * 100 and end <= 64 << 20
    ramdisk = struct.unpack_from("<II", memory.read(L.ZERO_PAGE_ADDR, 4096), 0x218)
    assert ramdisk == (start, 600)


def test_load_linux_bzimage_uses_its_64bit_entry(memory):
    data = make_bzimage(compress("gzip", VMLINUX))
    bz = L.parse_bzimage(data, "bz")
    lb = L.load_linux(memory, L.Kernel(None, bz, "bz"))
    assert lb.entry == 0x100_0000 + 0x200
    assert memory.read(0x100_0000, 64) == bz.protected_mode[:64]


def test_load_linux_too_little_memory():
    m = GuestMemory()
    m.add_region(0, 8 << 20)
    try:
        k = L.Kernel(L.parse_vmlinux(VMLINUX, "vmlinux"), None, "vmlinux")
        with pytest.raises(ConfigError, match="give it more memory"):
            L.load_linux(m, k)
    finally:
        m.close()


# --- fuzzing -----------------------------------------------------------------------------------

GOOD_BZ = make_bzimage(compress("gzip", VMLINUX))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(0, len(GOOD_BZ)),
    flips=st.lists(st.tuples(st.integers(0, len(GOOD_BZ) - 1), st.integers(0, 255)), max_size=8),
)
def test_fuzz_bzimage(cut, flips):
    data = bytearray(GOOD_BZ)
    for pos, value in flips:
        data[pos] = value
    data = bytes(data[:cut])
    try:
        bz = L.parse_bzimage(data, "fuzz")
        L.parse_vmlinux(L.decompress_payload(bz.payload, limit=1 << 20), "fuzz")
    except BadImage:
        pass


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(0, len(VMLINUX)),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
)
def test_fuzz_vmlinux(cut, flips):
    data = bytearray(VMLINUX)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    try:
        vm = L.parse_vmlinux(bytes(data[:cut]), "fuzz")
    except BadImage:
        return
    for s in vm.segments:
        assert s.offset + s.filesz <= len(data) and s.filesz <= s.memsz


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_payload(blob):
    for magic, _ in L._MAGICS:
        try:
            L.decompress_payload(magic + blob, limit=1 << 20)
        except BadImage:
            pass


def test_bzimage_cut_inside_the_header_fields():
    # Found by test_fuzz_bzimage: 'HdrS' present, the file ending before the version field.
    for cut in (0x206, 0x207, 0x263):
        with pytest.raises(BadImage, match="truncated inside its setup header"):
            L.parse_bzimage(GOOD_BZ[:cut], "cut")

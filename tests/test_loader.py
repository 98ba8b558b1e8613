"""Guest images: raw binaries, ELF32/ELF64 from the SDK and hand-made, and every way they can be
wrong (each must be one BadImage, never another exception)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import loader
from kvmpy.arch.x86.modes import Mode
from kvmpy.errors import BadImage
from kvmpy.loader import Image, ImageSegment, load_elf, load_file, load_raw
from kvmpy.memory import GuestMemory

K, M = 1 << 10, 1 << 20

GUEST_SRC = r"""
#include <kvmpy.h>

int counter = 5;                 /* .data */
static char buf[8192];           /* .bss */
const char message[] = "hi\n";   /* .rodata */

int main(void)
{
	buf[counter] = 1;
	hc_print_str(message);
	return counter + buf[3];
}
"""

PT_LOAD, PT_NOTE, PT_GNU_STACK = 1, 4, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4


# --- a small independent ELF reader and writer ---------------------------------------------------


def parse_phdrs(data: bytes) -> tuple[int, int, list[tuple[int, int, int, int, int, int]]]:
    """(class bits, entry, [(type, flags, offset, paddr, filesz, memsz)]) read with struct."""
    bits = 64 if data[4] == 2 else 32
    if bits == 64:
        entry, phoff = struct.unpack_from("<QQ", data, 24)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
    else:
        entry, phoff = struct.unpack_from("<II", data, 24)
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
    out = []
    for i in range(phnum):
        o = phoff + i * phentsize
        if bits == 64:
            t, fl, off, _va, pa, fs, ms, _al = struct.unpack_from("<IIQQQQQQ", data, o)
        else:
            t, off, _va, pa, fs, ms, fl, _al = struct.unpack_from("<IIIIIIII", data, o)
        out.append((t, fl, off, pa, fs, ms))
    return bits, entry, out


def make_elf(
    segments=((PT_LOAD, 0x10_0000, b"\xf4" * 16, 0x1000, PF_R | PF_X),),
    *,
    bits: int = 64,
    machine: int | None = None,
    etype: int = ET_EXEC,
    entry: int | None = None,
    vaddr_delta: int = 0,
    note: bytes | None = None,
    sections: bool = True,
) -> bytes:
    """An ELF executable. `segments` are (p_type, p_paddr, file bytes, p_memsz, p_flags);
    `note` adds a `.note.kvmpy` section with that descriptor (type 1, name "kvmpy")."""
    if machine is None:
        machine = EM_X86_64 if bits == 64 else EM_386
    if entry is None:
        entry = segments[0][1] if segments else 0
    ehsize, phentsize, shentsize = (64, 56, 64) if bits == 64 else (52, 32, 40)
    phoff = ehsize
    data_off = (phoff + phentsize * len(segments) + 0xF) & ~0xF
    blob = bytearray()
    ph = bytearray()
    for ptype, paddr, content, memsz, flags in segments:
        off = data_off + len(blob)
        blob += content
        va = paddr + vaddr_delta
        if bits == 64:
            ph += struct.pack("<IIQQQQQQ", ptype, flags, off, va, paddr, len(content), memsz, 16)
        else:
            ph += struct.pack("<IIIIIIII", ptype, off, va, paddr, len(content), memsz, flags, 16)
    body = bytearray(data_off - phoff - len(ph))
    out = bytearray(ph) + body + blob
    shoff = shnum = shstrndx = 0
    if sections:
        # Sections: null, .note.kvmpy (if any), .shstrtab.
        shstr = b"\0.shstrtab\0.note.kvmpy\0"
        sec_data_off = ehsize + len(out)
        note_bytes = b""
        if note is not None:
            name = b"kvmpy\0"
            note_bytes = struct.pack("<III", len(name), len(note), 1) + name.ljust(8, b"\0")
            note_bytes += note + bytes(-len(note) % 4)
        out += note_bytes
        shstr_off = ehsize + len(out)
        out += shstr
        while (ehsize + len(out)) % 8:
            out += b"\0"
        shoff = ehsize + len(out)
        headers = [(0, 0, 0, 0, 0)]  # name, type, offset, size, align
        if note is not None:
            headers.append((11, 7, sec_data_off, len(note_bytes), 4))  # SHT_NOTE
        headers.append((1, 3, shstr_off, len(shstr), 1))  # SHT_STRTAB
        for name_i, stype, off, size, align in headers:
            if bits == 64:
                out += struct.pack("<IIQQQQIIQQ", name_i, stype, 0, 0, off, size, 0, 0, align, 0)
            else:
                out += struct.pack("<IIIIIIIIII", name_i, stype, 0, 0, off, size, 0, 0, align, 0)
        shnum, shstrndx = len(headers), len(headers) - 1
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1, 0]) + bytes(8)
    if bits == 64:
        hdr = ident + struct.pack(
            "<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, shoff, 0,
            ehsize, phentsize, len(segments), shentsize, shnum, shstrndx,
        )  # fmt: skip
    else:
        hdr = ident + struct.pack(
            "<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, shoff, 0,
            ehsize, phentsize, len(segments), shentsize, shnum, shstrndx,
        )  # fmt: skip
    assert len(hdr) == ehsize
    return bytes(hdr + out)


def check_image_invariants(img: Image) -> None:
    """What every Image load_elf returns must satisfy."""
    assert img.kind in ("elf32", "elf64")
    assert img.segments, "an image without segments"
    for s in img.segments:
        assert s.memsz > 0 and len(s.data) <= s.memsz
    for a, b in zip(img.segments, img.segments[1:], strict=False):
        assert a.gpa < b.gpa and a.end <= b.gpa
    assert any(s.gpa <= img.entry < s.end for s in img.segments)


@pytest.fixture
def small_memory():
    m = GuestMemory()
    m.add_region(0, 2 * M)
    yield m
    m.close()


# --- raw images ----------------------------------------------------------------------------------


def test_raw_defaults():
    img = load_raw(b"\xf4\x90\x90")
    assert img.kind == "raw" and img.bits is None and img.mode_hint is None
    assert img.segments == (ImageSegment(0, b"\xf4\x90\x90", 3),)
    assert img.entry == 0 and img.size == 3
    assert img.ranges() == [(0, 3)]
    assert img.name == "raw image"


def test_raw_load_addr_and_entry():
    img = load_raw(b"abcd", load_addr=0x7C00)
    assert img.segments[0].gpa == 0x7C00 and img.entry == 0x7C00  # entry follows the load
    img = load_raw(b"abcd", load_addr=0x7C00, entry=0x7C02)
    assert img.entry == 0x7C02 and img.ranges() == [(0x7C00, 0x7C04)]
    with pytest.raises(BadImage, match="outside the image"):
        load_raw(b"abcd", entry=0x10)  # an entry point must lie inside the image


@pytest.mark.parametrize(
    "kw", [{"load_addr": -1}, {"entry": -4}, {"load_addr": -0x1000, "entry": 0}]
)
def test_raw_negative_addresses(kw):
    with pytest.raises(BadImage, match="non-negative"):
        load_raw(b"\xf4", **kw)


def test_raw_empty():
    with pytest.raises(BadImage, match="the image is empty"):
        load_raw(b"")


def test_raw_checks_no_mode():
    img = load_raw(b"\xf4")
    for mode in Mode:
        img.check_mode(mode)


def test_load_file_raw(tmp_path):
    p = tmp_path / "guest.bin"
    p.write_bytes(b"\xb0\x41\xe6\xe9\xf4")
    img = load_file(p)
    assert img.kind == "raw" and img.path == str(p) and img.name == "guest.bin"
    assert img.segments == (ImageSegment(0, p.read_bytes(), 5),) and img.entry == 0
    img = load_file(str(p), load_addr=0x1000, entry=0x1002)
    assert img.segments[0].gpa == 0x1000 and img.entry == 0x1002
    img = load_file(p, load_addr=0x2000)
    assert img.entry == 0x2000
    # Three bytes of the ELF magic are not an ELF: a raw image.
    p.write_bytes(b"\x7fEL")
    assert load_file(p).kind == "raw"


def test_load_file_empty(tmp_path):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty\.bin is empty"):
        load_file(p)


def test_load_file_missing(tmp_path):
    with pytest.raises(BadImage, match="no such file"):
        load_file(tmp_path / "nope.elf")


def test_load_file_directory(tmp_path):
    with pytest.raises(BadImage, match="directory|not a regular file"):
        load_file(tmp_path)


def test_load_file_device():
    with pytest.raises(BadImage, match="not a regular file"):
        load_file("/dev/null")


def test_load_file_fifo(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    with pytest.raises(BadImage, match="not a regular file"):
        load_file(p)  # must not block reading the FIFO


def test_load_file_through_a_file(tmp_path):
    """A path whose parent is a file fails with ENOTDIR, not ENOENT."""
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(BadImage, match="file/guest"):
        load_file(f / "guest")


def test_load_file_symlink_loop(tmp_path):
    p = tmp_path / "loop"
    p.symlink_to(p)
    with pytest.raises(BadImage, match="loop"):
        load_file(p)


def test_load_file_name_too_long(tmp_path):
    with pytest.raises(BadImage):
        load_file(tmp_path / ("x" * 300))


def test_load_file_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "MAX_IMAGE_FILE", 16)
    p = tmp_path / "big.bin"
    p.write_bytes(bytes(17))
    with pytest.raises(BadImage, match="larger than any guest image"):
        load_file(p)
    p.write_bytes(bytes(16))
    assert load_file(p).size == 16


# --- placing images in guest RAM -----------------------------------------------------------------


def test_place_raw(small_memory):
    small_memory.fill(0, 0x3000, 0xAA)
    load_raw(b"hello", load_addr=0x1000).place(small_memory)
    assert small_memory.read(0xFFF, 7) == b"\xaahello\xaa"


def test_place_zero_fills_bss(small_memory):
    small_memory.fill(0, 2 * M, 0xAA)
    img = load_elf(make_elf([(PT_LOAD, 0x10_0000, b"code", 0x2000, PF_R | PF_X)]))
    img.place(small_memory)
    assert small_memory.read(0x10_0000, 4) == b"code"
    assert small_memory.read(0x10_0004, 0x2000 - 4) == bytes(0x2000 - 4)
    assert small_memory.read(0x10_2000, 1) == b"\xaa"  # nothing past memsz
    assert small_memory.read(0xF_FFFF, 1) == b"\xaa"


@pytest.mark.parametrize(
    "gpa, size",
    [
        (2 * M - 4, 8),  # runs past the end of RAM
        (2 * M, 1),  # starts at the end
        (64 * M, 16),  # far above
        (1 << 40, 1),
    ],
)
def test_place_does_not_fit(small_memory, gpa, size):
    img = load_raw(b"\x90" * size, load_addr=gpa)
    with pytest.raises(BadImage, match=r"needs guest memory .* guest has 2M of RAM") as exc:
        img.place(small_memory)
    assert "--mem" in str(exc.value) and "--load-addr" in str(exc.value)
    assert small_memory.read(2 * M - 8, 8) == bytes(8)  # nothing written


def test_place_bss_does_not_fit(small_memory):
    img = load_elf(make_elf([(PT_LOAD, 0x1F_F000, b"\xf4", 0x2000, PF_R | PF_X)]))
    with pytest.raises(BadImage, match="needs guest memory"):
        img.place(small_memory)


def test_place_across_a_hole():
    m = GuestMemory()
    try:
        m.add_region(0, 64 * K)
        m.add_region(128 * K, 64 * K)
        img = load_raw(bytes(16), load_addr=64 * K - 8)
        with pytest.raises(BadImage, match="needs guest memory"):
            img.place(m)
        load_raw(b"ok", load_addr=128 * K).place(m)
        assert m.read(128 * K, 2) == b"ok"
    finally:
        m.close()


# --- ELF images built with the SDK ---------------------------------------------------------------

SDK_MODES = ["real", "protected", "paged32", "long", "long-user"]


@pytest.fixture(scope="module")
def sdk_elves(build_guest) -> dict[str, Path]:
    return {mode: build_guest(GUEST_SRC, mode) for mode in SDK_MODES}


@pytest.mark.parametrize("mode", SDK_MODES)
def test_sdk_elf(sdk_elves, mode):
    path = sdk_elves[mode]
    data = path.read_bytes()
    img = load_file(path)
    assert img == load_elf(data, str(path))
    bits = 64 if mode.startswith("long") else 32
    assert img.kind == f"elf{bits}" and img.bits == bits
    assert img.mode_hint is Mode(mode)
    assert img.path == str(path) and img.name == path.name
    check_image_invariants(img)

    ebits, entry, phdrs = parse_phdrs(data)
    assert ebits == bits
    assert img.entry == entry == img.symbols["_start"]
    assert {"main", "counter", "message", "_start"} <= set(img.symbols)
    loads = sorted((p for p in phdrs if p[0] == PT_LOAD and p[5]), key=lambda p: p[3])
    assert len(img.segments) == len(loads) >= 1
    for seg, (_t, flags, off, paddr, filesz, memsz) in zip(img.segments, loads, strict=True):
        assert seg.gpa == paddr and seg.memsz == memsz
        assert seg.data == data[off : off + filesz]
        assert seg.executable == bool(flags & PF_X)
    # The SDK links at 1 MiB (64 KiB-limited real mode at 0x1000), .bss included in memsz.
    base = 0x1000 if mode == "real" else 0x10_0000
    assert img.segments[0].gpa == base
    assert img.size >= 8192
    assert any(s.gpa <= img.symbols["counter"] < s.end for s in img.segments)

    # check_mode: an ELF runs in the modes of its class.
    for other in Mode:
        if (other.bits == 64) == (bits == 64):
            img.check_mode(other)
        else:
            with pytest.raises(BadImage, match=f"{path.name} is a {bits}-bit ELF") as exc:
                img.check_mode(other)
            hint = "long or long-user" if bits == 64 else "real, protected or paged32"
            assert f"use --mode {hint}" in str(exc.value)


def test_sdk_elf_places_segments(sdk_elves):
    img = load_file(sdk_elves["long-user"])
    m = GuestMemory()
    try:
        m.add_region(0, 4 * M)
        m.fill(0, 4 * M, 0xCC)
        img.place(m)
        for s in img.segments:
            assert m.read(s.gpa, len(s.data)) == s.data
            assert m.read(s.gpa + len(s.data), s.memsz - len(s.data)) == bytes(
                s.memsz - len(s.data)
            )
        assert m.read_u32(img.symbols["counter"]) == 5
        assert m.read(img.symbols["message"], 4) == b"hi\n\0"
    finally:
        m.close()


def test_sdk_elf_too_big_for_ram(sdk_elves):
    img = load_file(sdk_elves["protected"])
    m = GuestMemory()
    try:
        m.add_region(0, M)  # the image links at 1 MiB: just past the end
        with pytest.raises(BadImage, match=r"needs guest memory \[0x100000, .* guest has 1M"):
            img.place(m)
    finally:
        m.close()


def test_load_file_elf_with_load_addr(sdk_elves):
    with pytest.raises(BadImage, match="--load-addr applies to raw images"):
        load_file(sdk_elves["long-user"], load_addr=0x20_0000)
    with pytest.raises(BadImage, match="--load-addr"):
        load_file(sdk_elves["long-user"], load_addr=0)


def test_load_file_elf_with_entry(sdk_elves):
    path = sdk_elves["protected"]
    plain = load_file(path)
    img = load_file(path, entry=plain.symbols["main"])
    assert img.entry == plain.symbols["main"] != plain.entry
    assert img.segments == plain.segments and img.mode_hint == plain.mode_hint
    assert img.kind == plain.kind and img.path == plain.path


def test_elf_in_the_wrong_mode_through_load(sdk_elves):
    """check_mode with an image from a file: the message names the file and the way out."""
    img = load_file(sdk_elves["long"])
    with pytest.raises(
        BadImage, match=r"is a 64-bit ELF and cannot run in protected mode \(32-bit\)"
    ):
        img.check_mode(Mode.PROTECTED)
    with pytest.raises(BadImage, match=r"cannot run in real mode \(16-bit\)"):
        img.check_mode(Mode.REAL)
    img32 = load_file(sdk_elves["paged32"])
    with pytest.raises(BadImage, match=r"32-bit ELF and cannot run in long-user mode \(64-bit\)"):
        img32.check_mode(Mode.LONG_USER)


# --- broken ELFs ---------------------------------------------------------------------------------


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.fixture(scope="module")
def elf64_bytes(sdk_elves) -> bytes:
    return sdk_elves["long-user"].read_bytes()


@pytest.fixture(scope="module")
def elf32_bytes(sdk_elves) -> bytes:
    return sdk_elves["protected"].read_bytes()


def test_truncated_sdk_elf(elf64_bytes, elf32_bytes):
    for data in (elf64_bytes, elf32_bytes):
        n = len(data)
        _bits, _entry, phdrs = parse_phdrs(data)
        seg_off = next(p[2] for p in phdrs if p[0] == PT_LOAD)
        cuts = {4, 5, 16, 20, 40, 51, 52, 63, 64, 80, 100, 0x200, seg_off, seg_off + 1}
        cuts |= {n - 1, n - 8, n - 64, n // 2, n // 3}
        for cut in sorted(c for c in cuts if 4 <= c < n):
            with pytest.raises(BadImage, match="truncated|not a valid ELF"):
                load_elf(data[:cut], "cut.elf")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(4, 1 << 16))
def test_truncated_sdk_elf_property(elf64_bytes, cut):
    """Every proper prefix of a real ELF (that keeps the magic) is a BadImage: kvmpy's images end
    with the section headers, which the note lookup reads."""
    cut = min(cut, len(elf64_bytes) - 1)
    with pytest.raises(BadImage):
        load_elf(elf64_bytes[:cut])


def test_truncated_file_through_load_file(tmp_path, elf64_bytes):
    p = tmp_path / "cut.elf"
    p.write_bytes(elf64_bytes[:100])
    with pytest.raises(BadImage, match=r"cut\.elf is (truncated|not a valid ELF)"):
        load_file(p)


@pytest.mark.parametrize(
    "machine, name",
    [(EM_AARCH64, "EM_AARCH64"), (40, "EM_ARM"), (243, "EM_RISCV"), (0, "EM_NONE")],
)
def test_wrong_machine(elf64_bytes, machine, name):
    data = _patch(elf64_bytes, 18, "<H", machine)
    with pytest.raises(BadImage, match=f"guest.elf is an ELF for {name}, not x86"):
        load_elf(data, "/some/dir/guest.elf")


def test_unknown_machine_number(elf64_bytes):
    data = _patch(elf64_bytes, 18, "<H", 0xBEEF)
    with pytest.raises(BadImage, match="not x86"):
        load_elf(data)


@pytest.mark.parametrize(
    "etype, name", [(ET_DYN, "ET_DYN"), (ET_REL, "ET_REL"), (ET_CORE, "ET_CORE")]
)
def test_not_an_executable(elf64_bytes, elf32_bytes, etype, name):
    for data in (elf64_bytes, elf32_bytes):
        with pytest.raises(BadImage, match=f"is {name}, not an executable"):
            load_elf(_patch(data, 16, "<H", etype))


def test_class_machine_mismatch(elf32_bytes):
    # An ELF32 that claims x86-64 (the x32 ABI): refused, kvmpy does not run x32 code.
    with pytest.raises(BadImage, match="ELF class 32 does not match machine EM_X86_64"):
        load_elf(_patch(elf32_bytes, 18, "<H", EM_X86_64))
    with pytest.raises(BadImage, match="ELF class 64 does not match machine EM_386"):
        load_elf(make_elf(bits=64, machine=EM_386))


@pytest.mark.parametrize("bits", [32, 64])
def test_hand_made_elf(bits):
    segs = [
        (PT_LOAD, 0x20_0000, b"data", 0x1000, PF_R | PF_W),
        (PT_LOAD, 0x10_0000, b"\xf4code", 0x10, PF_R | PF_X),
        (PT_NOTE, 0x30_0000, b"note", 4, PF_R),  # not PT_LOAD: ignored
        (PT_GNU_STACK, 0, b"", 0, PF_R | PF_W),
        (PT_LOAD, 0x40_0000, b"", 0, PF_R),  # empty: ignored
    ]
    img = load_elf(make_elf(segs, bits=bits, entry=0x10_0001, note=b"protected\0"), "h.elf")
    assert img.kind == f"elf{bits}" and img.entry == 0x10_0001
    assert img.segments == (
        ImageSegment(0x10_0000, b"\xf4code", 0x10, True),
        ImageSegment(0x20_0000, b"data", 0x1000, False),
    )
    assert img.mode_hint is Mode.PROTECTED
    assert img.symbols == {}
    assert img.path == "h.elf"


def test_elf_loads_at_physical_addresses():
    """p_paddr, not p_vaddr, is where a segment goes (entry stays e_entry)."""
    data = make_elf(vaddr_delta=0xFFFF_FFFF_8000_0000)
    assert struct.unpack_from("<Q", data, 64 + 16)[0] == 0xFFFF_FFFF_8010_0000  # p_vaddr
    img = load_elf(data)
    assert img.segments[0].gpa == 0x10_0000


def test_elf_without_note_has_no_mode_hint():
    assert load_elf(make_elf()).mode_hint is None
    assert load_elf(make_elf(sections=False)).mode_hint is None


@pytest.mark.parametrize("mode", list(Mode))
def test_elf_mode_note(mode):
    img = load_elf(make_elf(note=mode.value.encode() + b"\0"))
    assert img.mode_hint is mode


def test_elf_unknown_mode_note():
    with pytest.raises(BadImage, match="names an unknown kvmpy mode 'turbo'"):
        load_elf(make_elf(note=b"turbo\0"), "x.elf")


def test_filesz_larger_than_memsz():
    data = make_elf([(PT_LOAD, 0x10_0000, b"\xf4" * 32, 16, PF_R | PF_X)])
    with pytest.raises(BadImage, match="a segment's file size exceeds its memory size"):
        load_elf(data, "fs.elf")


@pytest.mark.parametrize(
    "second",
    [
        (0x10_0000, 0x10),  # same start
        (0x10_0FFF, 0x10),  # last byte of the first
        (0x0F_FFF0, 0x20),  # ends inside the first
        (0x0F_0000, 0x20_0000),  # contains the first
    ],
)
def test_overlapping_segments(second):
    gpa, memsz = second
    segs = [
        (PT_LOAD, 0x10_0000, b"\xf4", 0x1000, PF_R | PF_X),
        (PT_LOAD, gpa, b"", memsz, PF_R | PF_W),
    ]
    with pytest.raises(BadImage, match=r"overlapping segments at \[0x"):
        load_elf(make_elf(segs), "ov.elf")


def test_adjacent_segments_are_fine():
    segs = [
        (PT_LOAD, 0x10_1000, b"", 0x1000, PF_R | PF_W),
        (PT_LOAD, 0x10_0000, b"\xf4", 0x1000, PF_R | PF_X),
        (PT_LOAD, 0x10_2000, b"x", 1, PF_R),
    ]
    img = load_elf(make_elf(segs, entry=0x10_0000))
    assert [s.gpa for s in img.segments] == [0x10_0000, 0x10_1000, 0x10_2000]
    check_image_invariants(img)


@pytest.mark.parametrize("entry", [0, 0xF_FFFF, 0x10_1000, 0x10_2000, 0x20_0000, 1 << 40])
def test_entry_outside_every_segment(entry):
    segs = [
        (PT_LOAD, 0x10_0000, b"\xf4", 0x1000, PF_R | PF_X),
        (PT_LOAD, 0x20_1000, b"", 0x1000, PF_R | PF_W),
    ]
    with pytest.raises(BadImage, match=f"entry point {entry:#x} is outside every loadable"):
        load_elf(make_elf(segs, entry=entry), "e.elf")


@pytest.mark.parametrize("entry", [0x10_0000, 0x10_0FFF, 0x20_1000, 0x20_1FFF])
def test_entry_inside_a_segment(entry):
    segs = [
        (PT_LOAD, 0x10_0000, b"\xf4", 0x1000, PF_R | PF_X),
        (PT_LOAD, 0x20_1000, b"", 0x1000, PF_R | PF_W),  # entry in .bss is odd but loadable
    ]
    assert load_elf(make_elf(segs, entry=entry)).entry == entry


def test_entry_in_sdk_elf_patched_outside(elf64_bytes):
    with pytest.raises(BadImage, match="entry point 0x4 is outside"):
        load_elf(_patch(elf64_bytes, 24, "<Q", 4))


def test_no_loadable_segments():
    with pytest.raises(BadImage, match="has no loadable segments"):
        load_elf(make_elf([(PT_GNU_STACK, 0, b"", 0, PF_R)]), "n.elf")
    with pytest.raises(BadImage, match="has no loadable segments"):
        load_elf(make_elf([]), "n.elf")
    with pytest.raises(BadImage, match="has no loadable segments"):
        load_elf(make_elf([(PT_LOAD, 0x10_0000, b"", 0, PF_R)]), "n.elf")


def test_segment_data_past_end_of_file():
    data = make_elf([(PT_LOAD, 0x10_0000, b"\xf4" * 64, 64, PF_R | PF_X)], sections=False)
    with pytest.raises(BadImage, match="truncated: a segment extends past the end of the file"):
        load_elf(data[:-1], "t.elf")
    # p_offset itself beyond the end.
    big = _patch(data, 64 + 8, "<Q", len(data) + 0x1000)
    with pytest.raises(BadImage, match="truncated"):
        load_elf(big)


def test_bss_only_segment_offset_is_irrelevant():
    """A segment with no file bytes reads nothing from the file, so where its p_offset points
    does not matter (linkers and strip leave such offsets at or past the end of the file)."""
    segs = [
        (PT_LOAD, 0x10_0000, b"\xf4", 0x1000, PF_R | PF_X),
        (PT_LOAD, 0x20_0000, b"", 0x4000, PF_R | PF_W),
    ]
    data = make_elf(segs, sections=False)
    second_offset = 64 + 56 + 8
    for off in (len(data), len(data) + 0x1000, 1 << 40):
        img = load_elf(_patch(data, second_offset, "<Q", off))
        assert img.segments[1] == ImageSegment(0x20_0000, b"", 0x4000, False)


def test_not_elf_after_magic():
    with pytest.raises(BadImage, match="not a valid ELF"):
        load_elf(b"\x7fELF")
    with pytest.raises(BadImage, match="not a valid ELF"):
        load_elf(b"\x7fELF" + bytes(60))
    with pytest.raises(BadImage, match="not a valid ELF"):
        load_elf(b"\x7fELF\x03\x01\x01" + bytes(100))  # ELFCLASS 3


def test_load_file_garbage_after_magic(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"\x7fELF" + b"\xff" * 100)
    with pytest.raises(BadImage, match="junk is not a valid ELF"):
        load_file(p)


# --- fuzzing: load_elf returns an Image or raises BadImage, nothing else -------------------------


def _load_or_badimage(data: bytes) -> None:
    try:
        img = load_elf(data, "fuzz.elf")
    except BadImage as e:
        assert str(e)
    else:
        check_image_invariants(img)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_fuzz_random_bytes_after_magic(tail):
    _load_or_badimage(b"\x7fELF" + tail)


@settings(max_examples=150, deadline=None)
@given(
    cls=st.sampled_from([1, 2]),
    endian=st.sampled_from([1, 2]),
    tail=st.binary(min_size=0, max_size=300),
)
def test_fuzz_plausible_ident(cls, endian, tail):
    _load_or_badimage(b"\x7fELF" + bytes([cls, endian, 1, 0]) + bytes(8) + tail)


def _header_offsets(n: int):
    # Mutations aimed at the ELF header and program headers, where the loader looks.
    return st.integers(0, min(n - 1, 0x100)) | st.integers(0, n - 1)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_mutated_sdk_elf(sdk_elves, data):
    mode = data.draw(st.sampled_from(["protected", "long-user"]))
    original = sdk_elves[mode].read_bytes()
    blob = bytearray(original)
    n = len(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["byte", "u16", "u32", "u64"]))
        off = data.draw(_header_offsets(n))
        size = {"byte": 1, "u16": 2, "u32": 4, "u64": 8}[kind]
        value = data.draw(
            st.sampled_from([0, 1, 0xFF, (1 << (8 * size)) - 1, 1 << (8 * size - 1)])
            | st.integers(0, (1 << (8 * size)) - 1)
        )
        blob[off : off + size] = value.to_bytes(size, "little")[: n - off]
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(4, n))]
    _load_or_badimage(bytes(blob))


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    segs=st.lists(
        st.tuples(
            st.sampled_from([PT_LOAD, PT_LOAD, PT_NOTE, 0]),
            st.integers(0, (1 << 32) - 1),
            st.binary(max_size=16),
            st.integers(0, 1 << 20),
            st.integers(0, 7),
        ),
        max_size=4,
    ),
    entry=st.integers(0, (1 << 32) - 1),
    etype=st.sampled_from([ET_EXEC, ET_EXEC, ET_DYN]),
    note=st.none() | st.sampled_from([b"long\0", b"bogus\0", b""]),
)
def test_fuzz_hand_made_elf(bits, segs, entry, etype, note):
    """Random segment tables: the loader accepts exactly the well-formed ones."""
    data = make_elf(segs, bits=bits, entry=entry, etype=etype, note=note)
    loads = sorted((s for s in segs if s[0] == PT_LOAD and s[3]), key=lambda s: s[1])
    well_formed = (
        etype == ET_EXEC
        and all(len(s[2]) <= s[3] for s in segs if s[0] == PT_LOAD)
        and loads
        and all(a[1] + a[3] <= b[1] for a, b in zip(loads, loads[1:], strict=False))
        and any(s[1] <= entry < s[1] + s[3] for s in loads)
        and note in (None, b"long\0")  # an empty or unknown mode name is an error
    )
    if well_formed:
        img = load_elf(data)
        check_image_invariants(img)
        assert [(s.gpa, s.data, s.memsz) for s in img.segments] == [
            (s[1], s[2], s[3]) for s in loads
        ]
        assert img.mode_hint == (Mode.LONG if note == b"long\0" else None)
    else:
        with pytest.raises(BadImage):
            load_elf(data)


def test_entry_outside_a_raw_image_is_refused(tmp_path):
    p = tmp_path / "raw.bin"
    p.write_bytes(b"\x90" * 16)
    with pytest.raises(BadImage, match="outside the image"):
        loader.load_file(p, load_addr=0x1000, entry=0x2000)
    assert loader.load_file(p, load_addr=0x1000, entry=0x100F).entry == 0x100F

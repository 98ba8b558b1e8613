"""GuestMemory, parse_size and format_size. No KVM needed: regions are plain memfd mappings."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import ConfigError, GuestMemoryError
from kvmpy.memory import MAX_GPA, PAGE_SIZE, GuestMemory, format_size, parse_size

K = 1 << 10
M = 1 << 20

# Two adjacent regions, a hole, and a third region: [0, 64K) [64K, 128K) hole [1M, 1M+16K).
LAYOUT = [(0, 64 * K, "low"), (64 * K, 64 * K, "mid"), (M, 16 * K, "high")]


def _layout_memory() -> GuestMemory:
    m = GuestMemory()
    for gpa, size, name in LAYOUT:
        m.add_region(gpa, size, name=name)
    return m


@pytest.fixture
def mem():
    m = _layout_memory()
    yield m
    m.close()


@pytest.fixture(scope="module")
def shared_mem():
    """For property tests (hypothesis runs many examples per fixture instance); every example
    leaves the memory all zero."""
    m = _layout_memory()
    yield m
    m.close()


def inside_one_region(gpa: int, length: int) -> bool:
    return length >= 0 and any(g <= gpa and gpa + length <= g + s for g, s, _ in LAYOUT)


# --- regions -------------------------------------------------------------------------------------


def test_regions_are_sorted_and_sized():
    m = GuestMemory()
    try:
        # Added out of order: lookups bisect, so the list must end up sorted.
        m.add_region(M, 16 * K, name="high")
        m.add_region(0, 64 * K, name="low")
        m.add_region(64 * K, 64 * K, name="mid")
        assert [r.name for r in m] == ["low", "mid", "high"]
        assert [r.gpa for r in m.regions] == [0, 64 * K, M]
        assert m.size == 144 * K
        assert m.region_at(M).end == M + 16 * K
        assert m.region_at(64 * K - 1).name == "low"
        assert m.region_at(64 * K).name == "mid"
    finally:
        m.close()


@pytest.mark.parametrize(
    "gpa, size",
    [
        (0, 0),  # empty
        (0, -PAGE_SIZE),  # negative size
        (0, 100),  # not a multiple of 4 KiB
        (0, PAGE_SIZE + 1),
        (1, PAGE_SIZE),  # unaligned address
        (0x800, PAGE_SIZE),
        (MAX_GPA - PAGE_SIZE, 2 * PAGE_SIZE),  # above the guest-physical limit
        (MAX_GPA, PAGE_SIZE),
        (-PAGE_SIZE, 2 * PAGE_SIZE),  # negative address
        (-2 * PAGE_SIZE, PAGE_SIZE),
    ],
)
def test_add_region_rejects_bad_geometry(gpa, size):
    m = GuestMemory()
    try:
        with pytest.raises(ConfigError, match="memory region 'r'"):
            m.add_region(gpa, size, name="r")
        assert m.regions == []
    finally:
        m.close()


def test_region_just_below_the_limit_is_accepted():
    m = GuestMemory()
    try:
        r = m.add_region(MAX_GPA - PAGE_SIZE, PAGE_SIZE)  # MAP_NORESERVE: costs nothing
        assert r.end == MAX_GPA
        m.write_u64(MAX_GPA - 8, 0x1122334455667788)
        assert m.read_u64(MAX_GPA - 8) == 0x1122334455667788
        with pytest.raises(GuestMemoryError):
            m.read_u8(MAX_GPA)
    finally:
        m.close()


@pytest.mark.parametrize(
    "gpa, size",
    [
        (0, 4 * K),  # same start as "low"
        (60 * K, 8 * K),  # straddles low/mid
        (64 * K - 4 * K, 4 * K + 4 * K),
        (120 * K, 16 * K),  # overlaps the end of "mid"
        (M - 4 * K, 8 * K),  # overlaps the start of "high"
        (M + 4 * K, 4 * K),  # inside "high"
        (0, 2 * M),  # covers everything
    ],
)
def test_add_region_rejects_overlap(mem, gpa, size):
    before = [(r.gpa, r.size) for r in mem]
    with pytest.raises(ConfigError, match="overlaps"):
        mem.add_region(gpa, size, name="new")
    assert [(r.gpa, r.size) for r in mem] == before


def test_add_region_fills_holes_exactly(mem):
    # Exactly the hole between "mid" and "high", touching both: not an overlap.
    r = mem.add_region(128 * K, M - 128 * K, name="hole")
    assert [x.name for x in mem] == ["low", "mid", "hole", "high"]
    assert mem.region_at(128 * K).name == "hole"
    assert mem.region_at(M - 1).name == "hole"
    assert mem.region_at(M).name == "high"
    assert r.end == M


def test_new_regions_are_zeroed_and_independent(mem):
    assert mem.read(0, 64 * K) == bytes(64 * K)
    assert mem.read(M, 16 * K) == bytes(16 * K)
    mem.fill(0, 64 * K, 0xAA)
    assert mem.read(64 * K, 16) == bytes(16)  # the neighbour is another memfd


def test_caller_supplied_fd_is_shared_and_not_closed():
    fd = os.memfd_create("test-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 3 * PAGE_SIZE)
        os.pwrite(fd, b"from the peer", PAGE_SIZE)
        m = GuestMemory()
        r = m.add_region(0x10000, 2 * PAGE_SIZE, name="shm", fd=fd, fd_offset=PAGE_SIZE)
        assert not r.owns_fd and r.fd == fd and r.fd_offset == PAGE_SIZE
        assert m.read(0x10000, 13) == b"from the peer"
        m.write(0x10000 + PAGE_SIZE, b"from the guest")
        assert os.pread(fd, 14, 2 * PAGE_SIZE) == b"from the guest"
        m.close()
        os.fstat(fd)  # still open: the region did not own it
    finally:
        os.close(fd)


def test_owned_fd_is_closed_on_close():
    m = GuestMemory()
    r = m.add_region(0, PAGE_SIZE)
    assert r.owns_fd
    fd = r.fd
    m.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert m.regions == [] and m.size == 0
    assert not m.is_ram(0)
    m.close()  # idempotent


def test_caller_fd_shorter_than_the_region_is_refused():
    """Mapping past the end of a file succeeds but the first access raises SIGBUS and kills the
    VMM; a too-short fd must be a ConfigError up front."""
    fd = os.memfd_create("test-short", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        m = GuestMemory()
        try:
            with pytest.raises(ConfigError, match="shm"):
                m.add_region(0, 2 * PAGE_SIZE, name="shm", fd=fd)
            with pytest.raises(ConfigError, match="shm"):
                m.add_region(0, PAGE_SIZE, name="shm", fd=fd, fd_offset=PAGE_SIZE)
            assert m.regions == []
            # Exactly the file's size is fine.
            m.add_region(0, PAGE_SIZE, name="shm", fd=fd)
            m.write_u32(PAGE_SIZE - 4, 7)
            assert m.read_u32(PAGE_SIZE - 4) == 7
        finally:
            m.close()
        os.fstat(fd)
    finally:
        os.close(fd)


def test_unaligned_fd_offset_is_a_config_error():
    fd = os.memfd_create("test-off", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE_SIZE)
        m = GuestMemory()
        try:
            with pytest.raises(ConfigError):
                m.add_region(0, PAGE_SIZE, fd=fd, fd_offset=100)
            assert m.regions == []
        finally:
            m.close()
    finally:
        os.close(fd)


# --- lookups -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpa, length, name",
    [
        (0, 1, "low"),
        (0, 64 * K, "low"),
        (64 * K - 1, 1, "low"),
        (64 * K, 1, "mid"),
        (64 * K, 64 * K, "mid"),
        (128 * K - 8, 8, "mid"),
        (M, 16 * K, "high"),
        (M + 16 * K - 1, 1, "high"),
        (5, 0, "low"),
    ],
)
def test_region_at_inside(mem, gpa, length, name):
    assert mem.region_at(gpa, length).name == name
    assert mem.is_ram(gpa, length)


@pytest.mark.parametrize(
    "gpa, length",
    [
        (-1, 1),
        (-1, 2),  # starts before RAM, ends inside
        (0, 64 * K + 1),  # straddles two adjacent regions
        (64 * K - 1, 2),
        (64 * K - 4, 8),
        (0, 128 * K),  # both adjacent regions exactly: still two regions
        (128 * K, 1),  # first byte of the hole
        (128 * K - 1, 2),  # last byte of "mid" and the hole
        (M - 1, 1),
        (M - 1, 2),
        (M + 16 * K, 1),  # one past the end
        (M + 16 * K - 1, 2),
        (M, 16 * K + 1),
        (1 << 40, 1),
        (0, -1),  # negative lengths
        (100, -50),
        (M, -(16 * K)),
    ],
)
def test_region_at_outside(mem, gpa, length):
    with pytest.raises(GuestMemoryError, match="not RAM"):
        mem.region_at(gpa, length)
    assert not mem.is_ram(gpa, length)


def test_empty_memory_has_no_ram():
    m = GuestMemory()
    assert not m.is_ram(0)
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)
    assert m.size == 0


# --- accessors -----------------------------------------------------------------------------------


def test_read_write_view_fill(mem):
    mem.write(0x100, b"hello")
    assert mem.read(0x100, 5) == b"hello"
    assert mem.read(0xFF, 7) == b"\0hello\0"
    mem.write(0x200, bytearray(b"ba"))
    mem.write(0x202, memoryview(b"cd"))
    assert mem.read(0x200, 4) == b"bacd"

    v = mem.view(0x300, 4)
    assert isinstance(v, memoryview) and len(v) == 4 and not v.readonly
    v[:] = b"wxyz"  # zero-copy: writes through to guest memory
    assert mem.read(0x300, 4) == b"wxyz"
    mem.write(0x301, b"Q")
    assert bytes(v) == b"wQyz"

    mem.fill(0x400, 16, 0x5A)
    assert mem.read(0x3FF, 18) == b"\0" + b"\x5a" * 16 + b"\0"
    mem.fill(0x404, 4)
    assert mem.read(0x400, 16) == b"\x5a" * 4 + bytes(4) + b"\x5a" * 8
    mem.fill(0x500, 0)  # zero-length fill is a no-op
    assert mem.read(0x500, 0) == b""


def test_scalar_accessors_little_endian(mem):
    mem.write_u16(0x10, 0xBEEF)
    mem.write_u32(0x20, 0xDEADBEEF)
    mem.write_u64(0x30, 0x0123456789ABCDEF)
    assert mem.read(0x10, 2) == b"\xef\xbe"
    assert mem.read(0x20, 4) == b"\xef\xbe\xad\xde"
    assert mem.read(0x30, 8) == bytes.fromhex("efcdab8967452301")
    assert mem.read_u8(0x10) == 0xEF
    assert mem.read_u16(0x10) == 0xBEEF
    assert mem.read_u32(0x20) == 0xDEADBEEF
    assert mem.read_u64(0x30) == 0x0123456789ABCDEF
    # Unaligned accesses are fine.
    mem.write_u64(0x41, 0xFFFF_FFFF_FFFF_FFFF)
    assert mem.read(0x40, 10) == b"\0" + b"\xff" * 8 + b"\0"
    assert mem.read_u32(0x43) == 0xFFFF_FFFF


def test_scalar_values_out_of_range_do_not_write(mem):
    import struct

    for write, bad in ((mem.write_u16, 1 << 16), (mem.write_u32, 1 << 32), (mem.write_u64, -1)):
        with pytest.raises(struct.error):
            write(0x80, bad)
    assert mem.read(0x80, 8) == bytes(8)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "gpa",
    [
        64 * K,  # last bytes of "mid" (filled below) are at 128K - size
        M,
        M + 16 * K,
    ],
)
def test_scalar_accessors_at_region_ends(mem, size, gpa):
    readers = {1: mem.read_u8, 2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}
    writers = {2: mem.write_u16, 4: mem.write_u32, 8: mem.write_u64}
    region = mem.region_at(gpa - 1 if gpa == M + 16 * K else gpa)
    last = region.end - size
    # The last `size` bytes of a region are accessible...
    assert readers[size](last) == 0
    if size in writers:
        writers[size](last, (1 << (8 * size)) - 1)
        assert readers[size](last) == (1 << (8 * size)) - 1
    # ...one byte further is not, and nothing changes.
    before = mem.read(region.gpa, region.size)
    with pytest.raises(GuestMemoryError):
        readers[size](last + 1)
    if size in writers:
        with pytest.raises(GuestMemoryError):
            writers[size](last + 1, 0)
    assert mem.read(region.gpa, region.size) == before


def test_accesses_straddling_adjacent_regions_fail_and_write_nothing(mem):
    edge = 64 * K  # "low" ends, "mid" begins
    with pytest.raises(GuestMemoryError):
        mem.write(edge - 2, b"abcd")
    with pytest.raises(GuestMemoryError):
        mem.write_u32(edge - 2, 0xFFFFFFFF)
    with pytest.raises(GuestMemoryError):
        mem.write_u64(edge - 1, 0xFFFFFFFFFFFFFFFF)
    with pytest.raises(GuestMemoryError):
        mem.fill(edge - 1, 2, 0xFF)
    with pytest.raises(GuestMemoryError):
        mem.read(edge - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.read_u16(edge - 1)
    with pytest.raises(GuestMemoryError):
        mem.view(edge - 8, 16)
    assert mem.read(edge - 8, 8) == bytes(8)
    assert mem.read(edge, 8) == bytes(8)


def test_negative_lengths_and_addresses_fail(mem):
    with pytest.raises(GuestMemoryError):
        mem.read(0x100, -1)
    with pytest.raises(GuestMemoryError):
        mem.view(0x100, -0x100)
    with pytest.raises(GuestMemoryError):
        mem.fill(0x100, -1)
    with pytest.raises(GuestMemoryError):
        mem.read(-1, 1)
    with pytest.raises(GuestMemoryError):
        mem.read_u8(-1)
    with pytest.raises(GuestMemoryError):
        mem.write(-4, b"abcd")


def test_write_larger_than_region_fails(mem):
    with pytest.raises(GuestMemoryError):
        mem.write(M, bytes(16 * K + 1))
    assert mem.read(M, 16) == bytes(16)


# --- gpa <-> hva ---------------------------------------------------------------------------------


def test_gpa_hva_round_trip(mem):
    for gpa in (0, 1, 0xFFF, 64 * K - 1, 64 * K, 100 * K, M, M + 16 * K - 1):
        hva = mem.gpa_to_hva(gpa)
        r = mem.region_at(gpa)
        assert hva == r.hva + (gpa - r.gpa)
        assert mem.hva_to_gpa(hva) == gpa
    # The hva is the host address of the same bytes.
    mem.write(M + 0x123, b"xyzzy")
    assert ctypes.string_at(mem.gpa_to_hva(M + 0x123), 5) == b"xyzzy"
    ctypes.memmove(mem.gpa_to_hva(0x40), b"host", 4)
    assert mem.read(0x40, 4) == b"host"


def test_gpa_hva_outside_ram(mem):
    for gpa in (-1, 128 * K, M - 1, M + 16 * K, 1 << 50):
        with pytest.raises(GuestMemoryError):
            mem.gpa_to_hva(gpa)
    # Just past either end of a mapping: not this region's RAM (mmap may have put another
    # region's mapping right there, and then the address belongs to that one).
    for r in mem:
        for hva in (r.hva - 1, r.hva + r.size):
            owner = [o for o in mem if o.hva <= hva < o.hva + o.size]
            if owner:
                assert owner[0] is not r
                assert mem.hva_to_gpa(hva) == owner[0].gpa + (hva - owner[0].hva)
            else:
                with pytest.raises(GuestMemoryError, match="not guest RAM"):
                    mem.hva_to_gpa(hva)
    with pytest.raises(GuestMemoryError):
        mem.hva_to_gpa(0)
    elsewhere = ctypes.create_string_buffer(16)  # host memory that is not guest RAM
    with pytest.raises(GuestMemoryError):
        mem.hva_to_gpa(ctypes.addressof(elsewhere))


# --- property: access succeeds iff the whole range is inside one region ----------------------------

gpas = st.one_of(
    st.integers(-0x2000, M + 0x8000),
    st.sampled_from([0, 64 * K, 128 * K, M, M + 16 * K]).flatmap(
        lambda b: st.integers(b - 16, b + 16)
    ),
)
lengths = st.one_of(st.integers(-4, 16), st.integers(-0x100, 0x30000))


@settings(max_examples=300, deadline=None)
@given(gpa=gpas, length=lengths, byte=st.integers(1, 255))
def test_access_succeeds_iff_inside_one_region(shared_mem, gpa, length, byte):
    mem = shared_mem
    expect = inside_one_region(gpa, length)
    assert mem.is_ram(gpa, length) == expect
    if expect:
        data = bytes([byte]) * length
        mem.write(gpa, data)
        assert mem.read(gpa, length) == data
        assert bytes(mem.view(gpa, length)) == data
        mem.fill(gpa, length)
        assert mem.read(gpa, length) == bytes(length)
    else:
        for op in (
            lambda: mem.read(gpa, length),
            lambda: mem.view(gpa, length),
            lambda: mem.fill(gpa, length, byte),
            lambda: mem.region_at(gpa, length),
        ):
            with pytest.raises(GuestMemoryError):
                op()
        if length > 0:
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, bytes([byte]) * length)
    # Nothing ever leaks into memory outside a successful write (all filled back to zero).
    for g, s, _ in LAYOUT:
        assert mem.read(g, s).count(0) == s


@settings(max_examples=200, deadline=None)
@given(gpa=gpas, size=st.sampled_from([1, 2, 4, 8]))
def test_scalar_access_succeeds_iff_inside_one_region(shared_mem, gpa, size):
    mem = shared_mem
    read = {1: mem.read_u8, 2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}[size]
    if inside_one_region(gpa, size):
        assert read(gpa) == 0
    else:
        with pytest.raises(GuestMemoryError):
            read(gpa)


# --- parse_size / format_size --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("0", 0),
        ("64K", 64 * K),
        ("64k", 64 * K),
        ("64M", 64 * M),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("2MiB", 2 * M),
        ("2mib", 2 * M),
        ("2MB", 2 * M),
        ("4KiB", 4 * K),
        ("4096B", 4096),
        ("0x1000", 0x1000),
        ("0X1000", 0x1000),
        ("0x10M", 16 * M),
        ("0o10K", 8 * K),
        (" 16M ", 16 * M),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    ["", " ", "M", "KiB", "B", "abc", "1.5G", "1e6", "64Q", "64MM", "G64", "--1", "0x", "1 2"],
)
def test_parse_size_rejects_junk(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1", "-4096", "-1M", "-0x1000", " -64K"])
def test_parse_size_rejects_negative_strings(text):
    with pytest.raises(ConfigError, match="negative"):
        parse_size(text)


def test_parse_size_rejects_negative_integers():
    with pytest.raises(ConfigError, match="negative"):
        parse_size(-4096)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0"),
        (1, "1"),
        (4095, "4095"),
        (1024, "1K"),
        (4096, "4K"),
        (1536 * K, "1536K"),
        (64 * M, "64M"),
        (1 << 30, "1G"),
        (3 << 30, "3G"),
        ((1 << 30) + M, "1025M"),
        (1 << 40, "1024G"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 44))
def test_format_parse_round_trip(n):
    assert parse_size(format_size(n)) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@pytest.mark.parametrize(
    "text, value",
    [
        ("0xb", 11),
        ("0x1b", 27),
        ("0xAB", 171),
        ("0x1000B", 0x1000B),
        ("0xbK", 11 * K),
        ("0x1bKiB", 27 * K),
        ("0x10KB", 16 * K),
    ],
)
def test_parse_size_hex_digit_b(text, value):
    assert parse_size(text) == value


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 44))
def test_parse_size_hex_round_trip(n):
    assert parse_size(hex(n)) == n
    assert parse_size(hex(n).upper()) == n


def test_own_memfd_is_sealed_against_shrinking():
    """A process that receives the region's fd cannot truncate it under our mapping."""
    import fcntl
    import os

    mem = GuestMemory()
    try:
        region = mem.add_region(0, 1 << 20)
        assert fcntl.fcntl(region.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 4096)
        mem.write(0xFF000, b"still mapped")
        assert mem.read(0xFF000, 12) == b"still mapped"
    finally:
        mem.close()


def test_on_write_sees_every_write_but_views(mem):
    seen = []
    mem.on_write = lambda gpa, n: seen.append((gpa, n))
    mem.write(0x10, b"abc")
    mem.fill(0x100, 32, 7)
    mem.fill(0x200, 8)
    mem.write_u16(0x300, 1)
    mem.write_u32(0x304, 1)
    mem.write_u64(0x308, 1)
    mem.view(0x400, 4)[:] = b"zzzz"  # raw views are the caller's business
    assert seen == [(0x10, 3), (0x100, 32), (0x200, 8), (0x300, 2), (0x304, 4), (0x308, 8)]
    with pytest.raises(GuestMemoryError):
        mem.write(200 * K, b"x")  # a refused write is not reported
    assert len(seen) == 6

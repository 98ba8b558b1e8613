"""The snapshot format (sparse memory file, index, checksums, atomic replacement), the control
protocol's request parser and the migration's address parser. No KVM needed: guest memory is a
plain GuestMemory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory import PAGE_SIZE, GuestMemory
from kvmpy.persist import format, memfile
from kvmpy.persist.control import parse_request
from kvmpy.persist.errors import ControlError, MigrationError, SnapshotError
from kvmpy.persist.migration import parse_address

M = 1 << 20
STATE = {"version": 1, "hello": "world", "numbers": list(range(10))}


@pytest.fixture
def memory():
    """8 MiB of RAM in two regions with a recognizable pattern: data, zero pages in the
    middle of data, and untouched space."""
    m = GuestMemory()
    m.add_region(0, 4 * M, name="low")
    m.add_region(8 * M, 4 * M, name="high")
    for page in (0, 1, 2, 5, 63, 64, 65, 200):
        m.write(page * PAGE_SIZE, bytes([page & 0xFF or 1]) * PAGE_SIZE)
    m.fill(3 * PAGE_SIZE, 2 * PAGE_SIZE, 0)  # touched but zero: must not be written
    m.write(8 * M + 17 * PAGE_SIZE + 100, b"high region data")
    yield m
    m.close()


def pages_of(memory: GuestMemory) -> dict[int, bytes]:
    """Logical page -> contents, for every non-zero page."""
    out = {}
    for region, base in memfile.logical_layout(memory):
        for i in range(region.size // PAGE_SIZE):
            data = bytes(region.view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            if any(data):
                out[base // PAGE_SIZE + i] = data
    return out


# --- memory file ---------------------------------------------------------------------------------


def test_nonzero_runs_and_chunk_splitting():
    buf = bytearray(10 * PAGE_SIZE)
    for p in (1, 2, 3, 7, 9):
        buf[p * PAGE_SIZE + 5] = 1
    assert list(memfile.nonzero_runs(memoryview(buf))) == [(1, 3), (7, 1), (9, 1)]
    assert list(memfile.nonzero_runs(memoryview(bytearray(PAGE_SIZE)))) == []
    assert list(memfile.split_by_chunk(60, 10)) == [(60, 4), (64, 6)]
    assert list(memfile.split_by_chunk(0, 130)) == [(0, 64), (64, 64), (128, 2)]


def test_memory_file_is_sparse_and_round_trips(memory, tmp_path):
    path = tmp_path / "mem"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        extents, written = memfile.write_memory(memory, fd)
    finally:
        os.close(fd)
    expected = pages_of(memory)
    assert written == len(expected) == 9
    assert sorted(p for e in extents for p in range(e.page, e.page + e.pages)) == sorted(expected)
    # Extents never cross a chunk, and each carries the CRC of its pages.
    raw = path.read_bytes()
    for e in extents:
        assert e.page // memfile.CHUNK_PAGES == (e.page + e.pages - 1) // memfile.CHUNK_PAGES
        assert zlib.crc32(raw[e.offset : e.offset + e.size]) == e.crc
    st = path.stat()
    assert st.st_size == memory.size  # all of RAM, holes included
    assert st.st_blocks * 512 <= 16 * PAGE_SIZE  # only the written pages occupy the disk
    index = memfile.pack_index(extents)
    assert memfile.unpack_index(index, memory.size // PAGE_SIZE) == extents

    fresh = GuestMemory()
    fresh.add_region(0, 4 * M)
    fresh.add_region(8 * M, 4 * M)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert memfile.read_memory(fresh, fd, extents) == written
    finally:
        os.close(fd)
    assert pages_of(fresh) == expected
    fresh.close()


@pytest.mark.parametrize(
    "records",
    [
        [(0, 0, 0)],  # empty extent
        [(5, 2, 0), (4, 1, 0)],  # out of order
        [(5, 2, 0), (6, 1, 0)],  # overlapping
        [(63, 2, 0)],  # crosses a chunk
        [(2047, 2, 0)],  # beyond RAM
    ],
)
def test_malformed_index_is_refused(records):
    data = b"".join(memfile.EXTENT.pack(*r) for r in records)
    with pytest.raises(SnapshotError, match="malformed"):
        memfile.unpack_index(data, 2048)
    with pytest.raises(SnapshotError, match="truncated"):
        memfile.unpack_index(data + b"x", 2048)


# --- the snapshot directory ----------------------------------------------------------------------


def test_write_and_open(memory, tmp_path):
    path = tmp_path / "snap"
    res = format.write(path, STATE, memory)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "memory",
        "memory.index",
        "state.json",
    ]
    assert res.pages_written == 9 and res.memory_bytes == memory.size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "kvmpy-snapshot" and manifest["version"] == format.VERSION
    with format.open_snapshot(path) as snap:
        assert snap.state == STATE
        assert snap.pages_written == 9
        assert snap.memory_size == memory.size


def _damage(path: Path, name: str, how: str) -> None:
    f = path / name
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[len(data) // 2] ^= 0x40
        f.write_bytes(data)
    elif how == "delete":
        f.unlink()


@pytest.mark.parametrize(
    "name,how,message",
    [
        ("manifest.json", "truncate", "not valid JSON"),
        ("manifest.json", "delete", "cannot read manifest.json"),
        ("state.json", "truncate", "state.json is truncated"),
        ("state.json", "flip", "state.json is corrupted"),
        ("state.json", "delete", "cannot read state.json"),
        ("memory.index", "truncate", "memory.index is truncated"),
        ("memory.index", "flip", "memory.index is corrupted"),
        ("memory", "truncate", "memory is truncated"),
        ("memory", "delete", "cannot open memory"),
    ],
)
def test_damaged_snapshots_are_refused(memory, tmp_path, name, how, message):
    path = tmp_path / "snap"
    format.write(path, STATE, memory)
    _damage(path, name, how)
    with pytest.raises(SnapshotError, match=message):
        format.open_snapshot(path)


def test_corrupted_memory_page_is_found_when_read(memory, tmp_path):
    path = tmp_path / "snap"
    format.write(path, STATE, memory)
    with open(path / "memory", "r+b") as f:
        f.seek(64 * PAGE_SIZE + 10)
        f.write(b"\xee")
    with format.open_snapshot(path) as snap:  # the pages' own checksums are checked on read
        fresh = GuestMemory()
        fresh.add_region(0, 4 * M)
        fresh.add_region(8 * M, 4 * M)
        with pytest.raises(SnapshotError, match="corrupted: pages 64-65"):
            memfile.read_memory(fresh, snap.memory_fd, snap.extents)
        fresh.close()


def test_manifest_edits_are_caught(memory, tmp_path):
    path = tmp_path / "snap"
    format.write(path, STATE, memory)
    doc = json.loads((path / "manifest.json").read_text())
    doc["memory"]["pages_written"] += 1
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="manifest.json is corrupted"):
        format.open_snapshot(path)


@pytest.mark.parametrize("version", [0, 3, "1", None])
def test_other_versions_are_refused(memory, tmp_path, version):
    path = tmp_path / "snap"
    format.write(path, STATE, memory)
    doc = json.loads((path / "manifest.json").read_text())
    doc["version"] = version
    doc["checksum"] = format._manifest_checksum(doc)
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(
        SnapshotError, match=f"format version {version}; this kvmpy reads versions 1 and 2 only"
    ):
        format.open_snapshot(path)


def test_version_2_is_a_page_store_snapshot(memory, tmp_path):
    """Version 2 (memory in a page store, tests/test_store.py) with a version 1 memory entry."""
    path = tmp_path / "snap"
    format.write(path, STATE, memory)
    doc = json.loads((path / "manifest.json").read_text())
    doc["version"] = 2
    doc["checksum"] = format._manifest_checksum(doc)
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="memory entry is malformed"):
        format.open_snapshot(path)


def test_not_a_snapshot(tmp_path):
    with pytest.raises(SnapshotError, match="no such directory"):
        format.open_snapshot(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(SnapshotError, match="does not describe a kvmpy-snapshot"):
        format.open_snapshot(tmp_path)


def test_replacing_keeps_one_complete_snapshot(memory, tmp_path):
    path = tmp_path / "snap"
    format.write(path, {"which": "old"}, memory)
    memory.write(0, b"new contents")
    format.write(path, {"which": "new"}, memory)
    with format.open_snapshot(path) as snap:
        assert snap.state == {"which": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


def test_failed_write_leaves_the_previous_snapshot(memory, tmp_path, monkeypatch):
    path = tmp_path / "snap"
    format.write(path, {"which": "old"}, memory)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def disk_full(memory, fd):
        os.write(fd, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memfile, "write_memory", disk_full)
    with pytest.raises(SnapshotError, match="No space left on device; the previous snapshot"):
        format.write(path, {"which": "new"}, memory)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


def test_file_size_limit_leaves_the_previous_snapshot(tmp_path):
    """A real write failure (the file-size limit, as a full disk would) in another process."""
    path = tmp_path / "snap"
    code = f"""
import resource, signal, sys
from kvmpy.memory import GuestMemory
from kvmpy.persist import format
from kvmpy.persist.errors import SnapshotError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
m = GuestMemory(); m.add_region(0, 8 << 20)
m.write(0, b"a" * (4 << 20))
format.write({str(path)!r}, {{"which": "old"}}, m)
m.write(0, b"b" * (4 << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    format.write({str(path)!r}, {{"which": "new"}}, m)
except SnapshotError as e:
    print(e)
    sys.exit(0)
sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "File too large; the previous snapshot" in proc.stdout
    with format.open_snapshot(path) as snap:
        assert snap.state == {"which": "old"}
        m = GuestMemory()
        m.add_region(0, 8 << 20)
        memfile.read_memory(m, snap.memory_fd, snap.extents)
        assert m.read(0, 4) == b"aaaa"
        m.close()
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


def test_refuses_to_replace_something_else(memory, tmp_path):
    victim = tmp_path / "important"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    with pytest.raises(SnapshotError, match="is not a kvmpy snapshot; refusing"):
        format.write(victim, STATE, memory)
    assert (victim / "notes.txt").read_text() == "keep me"


def test_install_falls_back_without_rename_exchange(memory, tmp_path, monkeypatch):
    def no_exchange(old, new, flags):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(format, "_renameat2", no_exchange)
    path = tmp_path / "snap"
    format.write(path, {"which": "old"}, memory)
    format.write(path, {"which": "new"}, memory)
    with format.open_snapshot(path) as snap:
        assert snap.state == {"which": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


# --- control protocol and addresses --------------------------------------------------------------


@pytest.mark.parametrize(
    "line,message",
    [
        (b"pause", "one JSON object per line"),
        (b"\xff\xfe", "one JSON object per line"),
        (b"[1, 2]", "JSON object with an 'op'"),
        (b'{"op": "reboot"}', "unknown op 'reboot'"),
        (b'{"cmd": "pause"}', "unknown op None"),
        (b'{"op": 5}', "unknown op 5"),
        (b'{"op": "snapshot"}', "snapshot needs path"),
        (b'{"op": "snapshot", "path": 7}', "path has the wrong type"),
        (b'{"op": "pause", "now": true}', "takes no argument 'now'"),
        (b'{"op": "migrate", "address": "h:1", "max_rounds": true}', "wrong type"),
    ],
)
def test_malformed_requests(line, message):
    with pytest.raises(ControlError, match=message):
        parse_request(line)


def test_good_requests():
    assert parse_request(b'{"op": "stats"}') == ("stats", {})
    assert parse_request(b'{"op": "migrate", "address": "h:1", "downtime_ms": 5}') == (
        "migrate",
        {"address": "h:1", "downtime_ms": 5},
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_any_bytes_give_a_request_or_a_control_error(line):
    try:
        op, args = parse_request(line)
    except ControlError:
        return
    assert isinstance(op, str) and isinstance(args, dict)


def test_parse_address():
    assert parse_address("127.0.0.1:4000") == ("127.0.0.1", 4000)
    assert parse_address("[::1]:5") == ("::1", 5)
    for bad in ("nohost", ":80", "h:port", "h:70000"):
        with pytest.raises(MigrationError):
            parse_address(bad)


# --- userfaultfd ABI -----------------------------------------------------------------------------


def test_userfaultfd_ioctl_numbers_match_the_kernel_headers(tmp_path, gcc_available):
    from kvmpy.persist import uffd

    src = tmp_path / "u.c"
    src.write_text(
        "#include <stdio.h>\n#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\n"
        'int main(void){printf("%lu %lu %lu %lu %lu %lu %zu %d\\n", (unsigned long)UFFDIO_API,'
        "(unsigned long)UFFDIO_REGISTER,(unsigned long)UFFDIO_UNREGISTER,(unsigned long)UFFDIO_WAKE,"
        "(unsigned long)UFFDIO_COPY,(unsigned long)UFFDIO_ZEROPAGE,sizeof(struct uffd_msg),"
        "UFFD_EVENT_PAGEFAULT);return 0;}\n"
    )
    exe = tmp_path / "u"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    got = list(map(int, subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()))
    assert got == [
        uffd.UFFDIO_API, uffd.UFFDIO_REGISTER, uffd.UFFDIO_UNREGISTER, uffd.UFFDIO_WAKE,
        uffd.UFFDIO_COPY, uffd.UFFDIO_ZEROPAGE, uffd.MSG_SIZE, uffd.UFFD_EVENT_PAGEFAULT,
    ]  # fmt: skip


# --- the hashchain guest's parameters ------------------------------------------------------------


def test_hashchain_image_patching(tmp_path, gcc_available):
    from kvmpy.loader import load_file
    from kvmpy.persist.guest import SYMBOL, HashchainParams, image_path, write_image

    params = HashchainParams(work_bytes=1 << 20, lines=3)
    out = write_image(tmp_path / "hc.elf", params)
    image = load_file(out)
    addr = image.symbols[SYMBOL]
    blob = b"".join(
        seg.data[addr - seg.gpa :]
        for seg in image.segments
        if seg.gpa <= addr < seg.gpa + len(seg.data)
    )
    assert blob[: len(params.pack())] == params.pack()
    assert out.read_bytes() != image_path().read_bytes()

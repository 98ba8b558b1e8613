"""The busybox initramfs: a newc archive the kernel (and cpio(1)) can read."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.boot import initramfs as I
from kvmpy.errors import ConfigError


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """name -> (mode, data, rdevmajor, rdevminor), checking the format as the kernel does."""
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        assert data[pos + namesize - 1] == 0
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == I.TRAILER:
            assert len(data) % 512 == 0
            return out
        out[name] = (mode, body, rmaj, rmin)


def test_writer_entries():
    w = I.CpioWriter()
    w.add_dir("dev")
    w.add_char_device("dev/console", 5, 1)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.add_symlink("bin/sh", "/bin/busybox")
    entries = parse_newc(w.finish())
    assert stat.S_ISDIR(entries["dev"][0])
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    assert entries["init"][1] == b"#!/bin/sh\n" and entries["init"][0] & 0o777 == 0o755
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"/bin/busybox"


def test_writer_refuses_duplicates_and_escapes():
    w = I.CpioWriter()
    w.add_file("a", b"")
    with pytest.raises(ConfigError, match="already has"):
        w.add_file("/a", b"")
    with pytest.raises(ConfigError, match="bad path"):
        w.add_file("../etc/passwd", b"")
    with pytest.raises(ConfigError, match="bad path"):
        w.add_file("/", b"")


def test_parse_addition(tmp_path):
    (tmp_path / "x").write_text("hi")
    add = I.parse_addition(f"{tmp_path}/x:/usr/bin/x")
    assert add.guest == "/usr/bin/x"
    with pytest.raises(ConfigError, match="HOST_PATH:GUEST_PATH"):
        I.parse_addition("nocolon")
    with pytest.raises(ConfigError, match="does not exist"):
        I.parse_addition(f"{tmp_path}/missing:/x")


def fake_busybox(tmp_path):
    """A stand-in 'busybox' that lists two applets, so the builder runs without apt."""
    bb = tmp_path / "busybox"
    bb.write_text("#!/bin/sh\nprintf 'bin/sh\\nbin/ls\\nusr/sbin/chroot\\n'\n")
    bb.chmod(0o755)
    return bb


def test_build_initramfs_layout(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "hello.txt").write_text("hello")
    (tmp_path / "tree" / "link").symlink_to("hello.txt")
    data = I.build_initramfs(
        busybox=fake_busybox(tmp_path),
        additions=[I.parse_addition(f"{tmp_path}/tree:/opt/tree")],
    )
    e = parse_newc(data)
    assert e["init"][1] == I.DEFAULT_INIT.encode() and e["init"][0] & 0o111
    assert I.INIT_MARKER in I.DEFAULT_INIT
    assert stat.S_ISCHR(e["dev/console"][0])
    assert e["bin/sh"][1] == b"/bin/busybox" and stat.S_ISLNK(e["usr/sbin/chroot"][0])
    assert e["opt/tree/hello.txt"][1] == b"hello"
    assert e["opt/tree/link"][1] == b"hello.txt"
    for d in ("proc", "sys", "dev", "tmp", "usr/sbin"):
        assert stat.S_ISDIR(e[d][0]), d


def test_custom_init_and_gzip(tmp_path):
    import gzip

    data = I.build_initramfs(
        busybox=fake_busybox(tmp_path), init="#!/bin/sh\necho hi\n", compress=True
    )
    assert parse_newc(gzip.decompress(data))["init"][1] == b"#!/bin/sh\necho hi\n"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) cross-check")
def test_cpio_tool_reads_it(tmp_path):
    data = I.build_initramfs(busybox=fake_busybox(tmp_path))
    r = subprocess.run(["cpio", "-it"], input=data, capture_output=True)
    assert r.returncode == 0 and b"dev/console" in r.stdout and b"init" in r.stdout


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.text("abc/._", min_size=1, max_size=12), st.binary(max_size=40)), max_size=12
    )
)
def test_fuzz_writer_names(entries):
    w = I.CpioWriter()
    for name, body in entries:
        try:
            w.ensure_parents(name)
            w.add_file(name, body)
        except ConfigError:
            pass
    parse_newc(w.finish())

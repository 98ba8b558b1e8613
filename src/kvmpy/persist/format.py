"""The snapshot directory: its files, checksums and versioning (docs/persist.md).

    DIR/manifest.json   format name and version, sizes and SHA-256 of the other files, and a
                        SHA-256 of the manifest itself
    DIR/state.json      vCPU, VM and VMM state (kvmpy.persist.state)
    DIR/memory.index    the extents of the memory file, each with its CRC-32 (memfile.py)
    DIR/memory          guest RAM, sparse: only non-zero pages are written

or, for a snapshot whose memory went into a page store (store.py; format version 2), only
manifest.json and state.json, the manifest naming the store, the snapshot's page map there and
that map's SHA-256.

A snapshot is written into a temporary directory next to DIR, every file and the directory are
fsync'ed, and only then does it take DIR's place: by an atomic exchange of the two directories
(renameat2 RENAME_EXCHANGE) when DIR exists, so that at every instant DIR is either the
complete old snapshot or the complete new one, whatever happens (a crash, a full disk, a kill).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kvm._sys import libc
from ..memory import PAGE_SIZE
from . import memfile
from .errors import SnapshotError

FORMAT = "kvmpy-snapshot"
#: Bumped whenever a reader of the old layout would misread the new one.
VERSION = 1
#: A snapshot whose memory is in a page store: an older kvmpy refuses it by its version.
STORE_VERSION = 2
VERSIONS = (VERSION, STORE_VERSION)

MANIFEST = "manifest.json"
STATE = "state.json"
INDEX = "memory.index"
MEMORY = "memory"

# Bounds for the files a snapshot may hold: reading them allocates that much.
MAX_MANIFEST = 1 << 20
MAX_STATE = 64 << 20

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1
SYS_renameat2 = 316


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# --- writing -------------------------------------------------------------------------------------


@dataclass
class WriteResult:
    path: Path
    pages_written: int
    memory_bytes: int  # logical size of the memory file
    disk_bytes: int  # what all files occupy on disk
    extents: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: For a snapshot into a page store: what went where.
    store: dict[str, Any] | None = None


def write(
    path: str | os.PathLike, state: dict[str, Any], memory, store: str | os.PathLike | None = None
) -> WriteResult:
    """Write a snapshot of `state` and guest `memory` to the directory `path`, atomically;
    with `store`, the memory goes into that page store (created if absent) instead."""
    if store is not None:
        return _write_to_store(Path(path), state, memory, Path(store))
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not (path / MANIFEST).is_file():
        raise SnapshotError(
            f"{path} exists and is not a kvmpy snapshot; refusing to replace it (choose another "
            "directory)"
        )
    if not parent.is_dir():
        raise SnapshotError(f"cannot write the snapshot: {parent} is not a directory")
    _sweep_stale(path)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        os.mkdir(tmp, 0o700)
        fd = os.open(tmp / MEMORY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            extents, pages = memfile.write_memory(memory, fd)
            timings["memory_write_ms"] = (time.perf_counter() - t0) * 1e3
            os.fsync(fd)
        finally:
            os.close(fd)
        timings["memory_sync_ms"] = (time.perf_counter() - t0) * 1e3 - timings["memory_write_ms"]
        index = memfile.pack_index(extents)
        state_bytes = json.dumps(state, separators=(",", ":")).encode()
        _write_file(tmp / INDEX, index)
        _write_file(tmp / STATE, state_bytes)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "state": {"file": STATE, "size": len(state_bytes), "sha256": _sha256(state_bytes)},
            "memory": {
                "file": MEMORY,
                "size": memory.size,
                "page_size": PAGE_SIZE,
                "chunk_pages": memfile.CHUNK_PAGES,
                "pages_written": pages,
                "index": {"file": INDEX, "size": len(index), "sha256": _sha256(index)},
            },
            "summary": _summary(state),
        }
        _commit(tmp, path, parent, manifest)
    except OSError as e:
        raise _write_failed(tmp, path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total_ms"] = (time.perf_counter() - t0) * 1e3
    return WriteResult(
        path=path,
        pages_written=pages,
        memory_bytes=memory.size,
        disk_bytes=disk_usage(path),
        extents=len(extents),
        timings_ms={k: round(v, 3) for k, v in timings.items()},
    )


def _write_to_store(path: Path, state: dict[str, Any], memory, store_path: Path) -> WriteResult:
    from .store import PageStore

    _check_target(path)
    _sweep_stale(path)
    parent = path.parent if str(path.parent) else Path(".")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    store = PageStore.open(store_path, create=True)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    # Under the store's shared lock from the first page to the installed snapshot: gc (which
    # takes it alone) must not see the registration before the directory that holds it.
    with store.lock():
        try:
            snap = uuid.uuid4().hex
            records, new_pages, new_bytes = store.write_pages(memory)
            timings["memory_write_ms"] = (time.perf_counter() - t0) * 1e3
            map_info = store.add_ref(snap, path.absolute(), records, memory.size // PAGE_SIZE)
            os.mkdir(tmp, 0o700)
            state_bytes = json.dumps(state, separators=(",", ":")).encode()
            _write_file(tmp / STATE, state_bytes)
            manifest = {
                "format": FORMAT,
                "version": STORE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "state": {"file": STATE, "size": len(state_bytes), "sha256": _sha256(state_bytes)},
                "memory": {
                    "store": str(store.path),
                    "snapshot": snap,
                    "map": map_info,
                    "size": memory.size,
                    "page_size": PAGE_SIZE,
                    "pages_written": len(records),
                },
                "summary": _summary(state),
            }
            _commit(tmp, path, parent, manifest)
        except OSError as e:
            raise _write_failed(tmp, path, e, f" (page store {store.path})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    timings["total_ms"] = (time.perf_counter() - t0) * 1e3
    return WriteResult(
        path=path,
        pages_written=len(records),
        memory_bytes=memory.size,
        disk_bytes=disk_usage(path) + new_bytes + map_info["size"],
        extents=0,
        timings_ms={k: round(v, 3) for k, v in timings.items()},
        store={
            "path": str(store.path),
            "snapshot": snap,
            "pages_new": new_pages,
            "pages_deduplicated": len(records) - new_pages,
            "new_bytes": new_bytes,
        },  # fmt: skip
    )


def _sweep_stale(path: Path) -> None:
    """Remove what writes of a snapshot to `path` killed before they finished left beside it
    (`.NAME.tmp-PID-NS` directories of processes that no longer exist)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        entries = list(parent.glob(f".{path.name}.tmp-*"))
    except OSError:
        return
    for d in entries:
        try:
            pid = int(d.name[len(path.name) + 6 :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_target(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not (path / MANIFEST).is_file():
        raise SnapshotError(
            f"{path} exists and is not a kvmpy snapshot; refusing to replace it (choose another "
            "directory)"
        )
    if not parent.is_dir():
        raise SnapshotError(f"cannot write the snapshot: {parent} is not a directory")


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(
        ctypes.c_long(SYS_renameat2), ctypes.c_int(AT_FDCWD), os.fsencode(old),
        ctypes.c_int(AT_FDCWD), os.fsencode(new), ctypes.c_uint(flags),
    )  # fmt: skip
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _commit(tmp: Path, path: Path, parent: Path, manifest: dict) -> None:
    """Write the manifest (checksummed) last, then move the finished directory into place."""
    manifest["checksum"] = _manifest_checksum(manifest)
    _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n")
    _fsync_dir(tmp)
    _install(tmp, path)
    _fsync_dir(parent)


def _write_failed(tmp: Path, path: Path, e: OSError, where: str = "") -> SnapshotError:
    shutil.rmtree(tmp, ignore_errors=True)
    what = "the previous snapshot there is untouched" if (path / MANIFEST).is_file() else ""
    return SnapshotError(
        f"cannot write the snapshot to {path}{where}: {e.strerror or e}"
        + (f"; {what}" if what else "")
    )


def _install(tmp: Path, path: Path) -> None:
    """Put the finished snapshot `tmp` in place of `path`."""
    if not path.exists():
        os.rename(tmp, path)
        return
    try:
        _renameat2(tmp, path, RENAME_EXCHANGE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # A file system without RENAME_EXCHANGE: move the old one aside first. A crash between
        # the two renames leaves it complete under its .old name.
        old = tmp.with_name(tmp.name + ".old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)  # now the old snapshot


def disk_usage(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())


def _summary(state: dict) -> dict:
    vmm, config = state.get("vmm", {}), state.get("config", {}).get("machine", {})
    return {
        "mode": config.get("mode"),
        "memory": config.get("memory"),
        "vcpus": config.get("vcpus"),
        "irqchip": config.get("irqchip"),
        "output_bytes": vmm.get("output_bytes"),
        "exits": sum(sum(s.get("counts", [])) for s in vmm.get("stats", [])),
    }


# --- reading -------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """An opened, checked snapshot. `memory_fd` stays open until `close()`."""

    path: Path
    manifest: dict
    state: dict
    extents: list[memfile.Extent]
    memory_fd: int
    memory_size: int
    index: bytes  # memory.index as read and checked (the lazy handler parses it again)
    #: A snapshot whose memory is in a page store: the store and where its pages are there
    #: (memory_fd is then -1, extents and index empty).
    store: Path | None = None
    located: Any = None

    @property
    def pages_written(self) -> int:
        return int(self.manifest["memory"]["pages_written"])

    def close(self) -> None:
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
            self.memory_fd = -1
        if self.located is not None:
            self.located.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bad(path: Path, why: str) -> SnapshotError:
    return SnapshotError(f"{path} is not a usable kvmpy snapshot: {why}")


def _read_checked(path: Path, entry: Any, name: str, limit: int) -> bytes:
    if not isinstance(entry, dict) or entry.get("file") != name:
        raise _bad(path.parent, f"the manifest entry for {name} is malformed")
    size = entry.get("size")
    if not isinstance(size, int) or not 0 <= size <= limit:
        raise _bad(path.parent, f"the manifest gives {name} an impossible size")
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise _bad(path.parent, f"cannot read {name}: {e.strerror}") from None
    if len(data) != size:
        raise _bad(path.parent, f"{name} is {'truncated' if len(data) < size else 'too long'}")
    if _sha256(data) != entry.get("sha256"):
        raise _bad(path.parent, f"{name} is corrupted (its checksum does not match)")
    return data


def open_snapshot(path: str | os.PathLike) -> Snapshot:
    """Open and check a snapshot: format, version, every checksum but the memory pages' own
    (those are checked as the pages are read) and the memory file's size."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            what = "a file" if path.is_file() else "not a directory"
            raise SnapshotError(
                f"{path} is {what}; a snapshot is a directory ('kvmpy ctl SOCK snapshot DIR' "
                "writes one)"
            )
        raise SnapshotError(f"{path} is not a snapshot directory (no such directory)")
    try:
        with open(path / MANIFEST, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except OSError as e:
        raise _bad(path, f"cannot read {MANIFEST}: {e.strerror}") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, f"{MANIFEST} is truncated or corrupted (not valid JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(path, f"{MANIFEST} does not describe a {FORMAT}")
    version = manifest.get("version")
    if version not in VERSIONS:
        raise SnapshotError(
            f"{path} is a kvmpy snapshot of format version {version}; this kvmpy reads "
            f"versions {VERSION} and {STORE_VERSION} only"
        )
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise _bad(path, f"{MANIFEST} is corrupted (its checksum does not match)")
    state_raw = _read_checked(path / STATE, manifest.get("state"), STATE, MAX_STATE)
    try:
        state = json.loads(state_raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, f"{STATE} is not valid JSON") from None
    mem = manifest.get("memory")
    if not isinstance(mem, dict):
        raise _bad(path, "the manifest has no memory entry")
    if version == STORE_VERSION:
        return _open_store_snapshot(path, manifest, state, mem)
    size = mem.get("size")
    if (
        mem.get("file") != MEMORY
        or mem.get("page_size") != PAGE_SIZE
        or mem.get("chunk_pages") != memfile.CHUNK_PAGES
        or not isinstance(size, int)
        or size <= 0
        or size % PAGE_SIZE
        or not isinstance(mem.get("pages_written"), int)
    ):
        raise _bad(path, "the manifest's memory entry is malformed")
    total_pages = size // PAGE_SIZE
    index_raw = _read_checked(path / INDEX, mem.get("index"), INDEX, total_pages * 16 + 16)
    try:
        extents = memfile.unpack_index(index_raw, total_pages)
    except SnapshotError as e:
        raise _bad(path, str(e)) from None
    if sum(e.pages for e in extents) != mem["pages_written"]:
        raise _bad(path, "the memory index disagrees with the manifest")
    try:
        fd = os.open(path / MEMORY, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _bad(path, f"cannot open {MEMORY}: {e.strerror}") from None
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise _bad(
            path,
            f"{MEMORY} is {'truncated' if actual < size else 'too long'} ({actual} bytes, "
            f"expected {size})",
        )
    return Snapshot(path, manifest, state, extents, fd, size, index_raw)


def _store_memory_entry(path: Path, mem: dict) -> tuple[str, str, int, int]:
    size, pages, snap = mem.get("size"), mem.get("pages_written"), mem.get("snapshot")
    if (
        not isinstance(mem.get("store"), str)
        or not mem["store"]
        or not isinstance(snap, str)
        or not isinstance(mem.get("map"), dict)
        or mem.get("page_size") != PAGE_SIZE
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size <= 0
        or size % PAGE_SIZE
        or not isinstance(pages, int)
        or isinstance(pages, bool)
        or not 0 <= pages <= size // PAGE_SIZE
    ):
        raise _bad(path, "the manifest's memory entry is malformed")
    return mem["store"], snap, size, pages


def _open_store_snapshot(path: Path, manifest: dict, state: dict, mem: dict) -> Snapshot:
    from .store import PageStore

    store_path, snap, size, pages = _store_memory_entry(path, mem)
    store = PageStore.open(store_path)
    with store.lock():
        records = store.read_map(snap, mem["map"], size // PAGE_SIZE)
        if len(records) != pages:
            raise _bad(path, "its page map disagrees with the manifest")
        located = store.locate(records)
    return Snapshot(path, manifest, state, [], -1, size, b"", store=store.path, located=located)


def holds_store_snapshot(path: Path, store: Path, snap: str) -> tuple[bool, str | None]:
    """Does the directory `path` hold snapshot `snap` of page store `store`? (gc's question:
    a registration whose directory is gone, or now holds another snapshot, is dead.)"""
    try:
        with open(path / MANIFEST, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        return False, "its directory is gone" if not path.exists() else "it holds no snapshot"
    except OSError:
        return True, "its directory cannot be read"  # keep it: we cannot tell
    try:
        manifest = json.loads(raw)
        if manifest.get("checksum") != _manifest_checksum(manifest):
            return True, "its manifest is corrupted"
        mem = manifest.get("memory") or {}
        if manifest.get("version") != STORE_VERSION or mem.get("snapshot") != snap:
            return False, "its directory holds another snapshot now"
        if Path(mem.get("store", "")).resolve() != store.resolve():
            return False, "its directory holds a snapshot of another store"
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return True, "its manifest is corrupted"
    return True, None

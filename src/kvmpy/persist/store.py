"""A content-addressed page store that many snapshots share (docs/persist.md, docs/memory.md).

`kvmpy ctl SOCK snapshot DIR --store STORE` writes the VM's state into DIR as usual, but its
memory into STORE, where a page is kept once whatever number of snapshots (of one VM, or of
many VMs) hold it. A page's address is the SHA-256 of its 4 KiB, which is also its checksum.

    STORE/store.json        format name, version, page size, hash, and a checksum of itself
    STORE/lock              flock(2): snapshot writers and readers share it, gc holds it alone
    STORE/packs/ID.pack     pages, 4 KiB each, back to back: the new pages of one snapshot
    STORE/packs/ID.idx      the pack's index: the SHA-256 of each page in pack order, then a
                            SHA-256 of the index itself. Written, fsync'ed and renamed into place
                            after the pack is complete and fsync'ed: the index *commits* the pack.
                            A pack without an index is a write that never finished (ignored,
                            removed by gc).
    STORE/refs/SNAP.map     one snapshot's memory: (logical page, SHA-256) for each non-zero
                            page, in page order, then a SHA-256 of the map
    STORE/refs/SNAP.json    the snapshot's registration: its directory and its map's checksum

Crash safety follows from the order of writes: nothing that exists is ever changed, only new
files are added (each written to a temporary name, fsync'ed, renamed), and each step is
committed by the last rename: pack, then its index, then the snapshot's map and registration,
then the snapshot directory itself (format.py's atomic install). A write killed at any point
leaves the store as it was plus files nothing refers to, which `kvmpy store gc` removes; older
snapshots never depend on anything a newer write touches.

Reading checks everything: the store's and the map's checksums, each pack index's checksum,
and every page against its SHA-256 as it is read (lazy restore included: the handler process
checks each page before it reaches the guest). gc finds which snapshots are alive by their
registration: a snapshot whose directory is gone, or now holds another snapshot, releases its
pages. Move a snapshot directory and gc takes it for deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..memory import PAGE_SIZE
from .errors import SnapshotError
from .handler import FDS_PER_MESSAGE  # noqa: F401 (how many packs a handler message carries)
from .handler import STORE_RECORD as LAZY_RECORD

FORMAT = "kvmpy-page-store"
VERSION = 1
HASH = "sha256"
DIGEST = 32

STORE_JSON = "store.json"
LOCK = "lock"
PACKS = "packs"
REFS = "refs"

IDX_MAGIC = b"KVPIDX01"
MAP_MAGIC = b"KVPMAP01"
_HEAD = struct.Struct("<8sQ")  # magic, count
_MAP_HEAD = struct.Struct("<8sQQ")  # magic, count, RAM pages
_RECORD = struct.Struct("<Q32s")  # logical page, SHA-256
#: Pages a pack may hold, and so an index may list (16 TiB): reading an index allocates that.
MAX_PACK_PAGES = 1 << 32
#: A page map longer than this (1 TiB of RAM, all of it non-zero) is not one.
MAX_MAP_BYTES = _MAP_HEAD.size + (1 << 28) * _RECORD.size + DIGEST
#: Bounds for what gc and du read of a registration file.
MAX_REF_JSON = 64 << 10
#: Threads that hash pages: hashlib releases the GIL for buffers over 2 KiB.
HASH_THREADS = 2
_IOV_MAX = 512


def _sha(data) -> bytes:
    return hashlib.sha256(data).digest()


def _json_checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _bad(store: Path, why: str) -> SnapshotError:
    return SnapshotError(f"{store} is not a usable kvmpy page store: {why}")


# --- the binary files ----------------------------------------------------------------------------


def pack_index(digests: list[bytes]) -> bytes:
    body = _HEAD.pack(IDX_MAGIC, len(digests)) + b"".join(digests)
    return body + _sha(body)


def unpack_index(data: bytes, what: str = "a pack index") -> list[bytes]:
    """The digests of a pack index, checked (SnapshotError for anything else)."""
    if len(data) < _HEAD.size + DIGEST:
        raise SnapshotError(f"{what} is truncated")
    magic, count = _HEAD.unpack_from(data)
    if magic != IDX_MAGIC:
        raise SnapshotError(f"{what} is not a kvmpy pack index")
    if count > MAX_PACK_PAGES or len(data) != _HEAD.size + count * DIGEST + DIGEST:
        raise SnapshotError(f"{what} is truncated or too long")
    if _sha(data[:-DIGEST]) != data[-DIGEST:]:
        raise SnapshotError(f"{what} is corrupted (its checksum does not match)")
    base = _HEAD.size
    return [data[base + i * DIGEST : base + (i + 1) * DIGEST] for i in range(count)]


def pack_map(records: list[tuple[int, bytes]], total_pages: int) -> bytes:
    body = _MAP_HEAD.pack(MAP_MAGIC, len(records), total_pages) + b"".join(
        _RECORD.pack(p, d) for p, d in records
    )
    return body + _sha(body)


def unpack_map(data: bytes, total_pages: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """A snapshot's page map, checked: (records, RAM pages). Pages strictly increase and lie in
    RAM; with `total_pages`, the map must be for RAM of that size."""
    if len(data) < _MAP_HEAD.size + DIGEST:
        raise SnapshotError("the page map is truncated")
    magic, count, pages = _MAP_HEAD.unpack_from(data)
    if magic != MAP_MAGIC:
        raise SnapshotError("the page map is not a kvmpy page map")
    if count > pages or len(data) != _MAP_HEAD.size + count * _RECORD.size + DIGEST:
        raise SnapshotError("the page map is truncated or too long")
    if total_pages is not None and pages != total_pages:
        raise SnapshotError(f"the page map is for {pages} pages of RAM, not {total_pages}")
    if _sha(data[:-DIGEST]) != data[-DIGEST:]:
        raise SnapshotError("the page map is corrupted (its checksum does not match)")
    records = list(_RECORD.iter_unpack(data[_MAP_HEAD.size : -DIGEST]))
    prev = -1
    for page, _ in records:
        if page <= prev or page >= pages:
            raise SnapshotError("the page map is malformed (pages out of order or outside RAM)")
        prev = page
    return records, pages


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name, fsync'ed: `path` appears complete or
    not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SnapshotError(f"{path.name} is larger than {limit} bytes")
    return data


# --- the store -----------------------------------------------------------------------------------


@dataclass
class Located:
    """Where a snapshot's pages are: parallel lists, in logical page order."""

    pages: list[int]
    digests: list[bytes]
    pack: list[int]  # index into `fds`
    slot: list[int]  # page number within the pack
    fds: list[int] = field(default_factory=list)
    pack_ids: list[str] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def runs(self) -> Iterator[tuple[int, int, int, int]]:
        """(first map index, count, pack, first slot) of runs of pages that follow each other
        both in guest memory and in one pack: one read each."""
        n = len(self.pages)
        i = 0
        while i < n:
            j = i + 1
            while (j < n and j - i < 64 and self.pages[j] == self.pages[j - 1] + 1
                   and self.pack[j] == self.pack[i] and self.slot[j] == self.slot[j - 1] + 1
                   and self.pages[j] // 64 == self.pages[i] // 64):  # fmt: skip
                j += 1
            yield i, j - i, self.pack[i], self.slot[i]
            i = j


class PageStore:
    """A page store at `path` (`PageStore.open(path, create=True)` makes one)."""

    def __init__(self, path: Path):
        self.path = path
        self._index: dict[bytes, tuple[str, int]] | None = None
        #: Packs whose index could not be used, and why: their pages are not in `index()`,
        #: so a damaged pack fails only the snapshots that need it (and gc).
        self.damaged: dict[str, str] = {}

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False) -> PageStore:
        path = Path(path).absolute()
        meta = path / STORE_JSON
        if create and not meta.exists():
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise SnapshotError(
                    f"{path} exists and is not a kvmpy page store; refusing to use it (choose "
                    "another --store)"
                )
            try:
                (path / PACKS).mkdir(parents=True, exist_ok=True)
                (path / REFS).mkdir(exist_ok=True)
                (path / LOCK).touch()
                doc = {"format": FORMAT, "version": VERSION, "page_size": PAGE_SIZE,
                       "hash": HASH, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())}  # fmt: skip
                doc["checksum"] = _json_checksum(doc)
                _write_new(meta, json.dumps(doc, indent=1).encode() + b"\n")
                _fsync_dir(path)
            except OSError as e:
                raise SnapshotError(f"cannot create the page store {path}: {e.strerror}") from None
        store = cls(path)
        store._check()
        return store

    def _check(self) -> None:
        if not self.path.is_dir():
            raise SnapshotError(f"{self.path} is not a kvmpy page store (no such directory)")
        try:
            doc = json.loads(_read_bounded(self.path / STORE_JSON, MAX_REF_JSON))
        except FileNotFoundError:
            raise _bad(self.path, f"it has no {STORE_JSON}") from None
        except (OSError, ValueError, UnicodeDecodeError, SnapshotError):
            raise _bad(self.path, f"{STORE_JSON} is unreadable or corrupted") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _bad(self.path, f"{STORE_JSON} does not describe a {FORMAT}")
        if doc.get("version") != VERSION:
            raise SnapshotError(
                f"{self.path} is a kvmpy page store of version {doc.get('version')}; this kvmpy "
                f"reads version {VERSION} only"
            )
        if doc.get("checksum") != _json_checksum(doc):
            raise _bad(self.path, f"{STORE_JSON} is corrupted (its checksum does not match)")
        if doc.get("page_size") != PAGE_SIZE or doc.get("hash") != HASH:
            raise _bad(self.path, f"{STORE_JSON} names another page size or hash")
        for d in (PACKS, REFS):
            if not (self.path / d).is_dir():
                raise _bad(self.path, f"its {d}/ directory is missing")

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False, wait: bool = True):
        """Writers and readers share the lock; gc takes it alone, so it never removes a page a
        write under way is about to refer to."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SnapshotError(f"cannot open the lock of {self.path}: {e.strerror}") from None
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise SnapshotError(
                    f"{self.path} is in use (a snapshot or restore is reading or writing it); "
                    "try again when it is done"
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    # --- the index -------------------------------------------------------------------------

    def packs(self) -> list[str]:
        """Committed packs (those with an index), by id."""
        return sorted(
            p.stem for p in (self.path / PACKS).glob("*.idx") if not p.name.startswith(".")
        )

    def read_pack_index(self, pack: str) -> list[bytes]:
        idx = self.path / PACKS / f"{pack}.idx"
        try:
            size = idx.stat().st_size
            if size > _HEAD.size + MAX_PACK_PAGES * DIGEST + DIGEST:
                raise SnapshotError(f"the index of pack {pack} is too long")
            digests = unpack_index(idx.read_bytes(), f"the index of pack {pack}")
            data = (self.path / PACKS / f"{pack}.pack").stat().st_size
        except OSError as e:
            raise _bad(self.path, f"pack {pack} is unreadable: {e.strerror}") from None
        except SnapshotError as e:
            raise _bad(self.path, str(e)) from None
        if data < len(digests) * PAGE_SIZE:
            raise _bad(self.path, f"pack {pack} is truncated")
        return digests

    def index(self) -> dict[bytes, tuple[str, int]]:
        """digest -> (pack, slot) of every committed page (the first copy of a duplicate)."""
        if self._index is None:
            index: dict[bytes, tuple[str, int]] = {}
            self.damaged = {}
            for pack in self.packs():
                try:
                    digests = self.read_pack_index(pack)
                except SnapshotError as e:
                    self.damaged[pack] = str(e)
                    continue
                for slot, d in enumerate(digests):
                    index.setdefault(d, (pack, slot))
            self._index = index
        return self._index

    # --- writing a snapshot's memory -------------------------------------------------------

    def write_pages(self, memory) -> tuple[list[tuple[int, bytes]], int, int]:
        """Put the non-zero pages of guest `memory` (paused) into the store: new ones into a
        new pack. Returns the page map records, the pages newly stored, and the pack bytes
        written. Call under `lock()`."""
        from . import memfile

        index = self.index()
        runs = list(memfile.written_runs(memory))

        def digests(run: tuple[int, memoryview]) -> list[bytes]:
            _, view = run
            return [_sha(view[i : i + PAGE_SIZE]) for i in range(0, len(view), PAGE_SIZE)]

        records: list[tuple[int, bytes]] = []
        new: dict[bytes, int] = {}
        pending: list[memoryview] = []
        pack = uuid.uuid4().hex
        pack_path = self.path / PACKS / f"{pack}.pack"
        fd = -1
        # The pool hashes later runs while this thread writes earlier ones (map yields in
        # order as results come). SHA-256 costs ~5 µs a page here (42 ms for 32 MiB).
        pool = ThreadPoolExecutor(HASH_THREADS)
        try:
            for (first, view), ds in zip(runs, pool.map(digests, runs), strict=True):
                for k, d in enumerate(ds):
                    records.append((first + k, d))
                    if d in index or d in new:
                        continue
                    if fd < 0:
                        fd = os.open(pack_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                     os.O_CLOEXEC, 0o600)  # fmt: skip
                    new[d] = len(new)
                    pending.append(view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
                    if len(pending) >= _IOV_MAX:
                        _writev_all(fd, pending)
                        pending = []
            if fd >= 0:
                _writev_all(fd, pending)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                _write_new(self.path / PACKS / f"{pack}.idx", pack_index(list(new)))
                _fsync_dir(self.path / PACKS)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                pack_path.unlink()
            raise
        finally:
            pool.shutdown(cancel_futures=True)
        for d, slot in new.items():
            index[d] = (pack, slot)
        return records, len(new), len(new) * PAGE_SIZE

    def add_ref(self, snap: str, path: Path, records: list[tuple[int, bytes]],
                total_pages: int) -> dict[str, Any]:  # fmt: skip
        """Register snapshot `snap` (to be installed at `path`) with its page map."""
        data = pack_map(records, total_pages)
        _write_new(self.path / REFS / f"{snap}.map", data)
        ref = {"snapshot": snap, "path": str(Path(path).absolute()),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "pages": len(records), "map": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}  # fmt: skip
        _write_new(self.path / REFS / f"{snap}.json", json.dumps(ref).encode())
        _fsync_dir(self.path / REFS)
        return ref["map"]

    # --- reading a snapshot's memory -------------------------------------------------------

    def read_map(self, snap: str, expect: dict, total_pages: int) -> list[tuple[int, bytes]]:
        """The map of snapshot `snap`, checked against the checksum its manifest gives."""
        if not _ID_OK(snap):
            raise _bad(self.path, "the snapshot names a malformed page map")
        size = expect.get("size") if isinstance(expect, dict) else None
        if (
            not isinstance(size, int)
            or not 0 < size <= _MAP_HEAD.size + total_pages * _RECORD.size + DIGEST
        ):
            raise SnapshotError("the manifest gives the page map an impossible size")
        try:
            data = _read_bounded(self.path / REFS / f"{snap}.map", size)
        except FileNotFoundError:
            raise _bad(
                self.path, f"it has no page map for snapshot {snap} (was it removed?)"
            ) from None
        except OSError as e:
            raise _bad(
                self.path, f"cannot read the page map of snapshot {snap}: {e.strerror}"
            ) from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != expect.get("sha256"):
            raise _bad(
                self.path,
                f"the page map of snapshot {snap} is corrupted (its checksum does not match)",
            )
        try:
            return unpack_map(data, total_pages)[0]
        except SnapshotError as e:
            raise _bad(self.path, str(e)) from None

    def locate(self, records: list[tuple[int, bytes]]) -> Located:
        """Find every page of a map; open the packs that hold them (the descriptors keep them
        readable even if gc later removes them)."""
        index = self.index()
        loc = Located([], [], [], [])
        packs: dict[str, int] = {}
        missing = 0
        for page, d in records:
            where = index.get(d)
            if where is None:
                missing += 1
                continue
            pack, slot = where
            if pack not in packs:
                packs[pack] = len(loc.pack_ids)
                loc.pack_ids.append(pack)
            loc.pages.append(page)
            loc.digests.append(d)
            loc.pack.append(packs[pack])
            loc.slot.append(slot)
        if missing:
            why = ""
            if self.damaged:
                pack, reason = next(iter(self.damaged.items()))
                why = f" ({reason.split(': ', 1)[-1]})"
            raise _bad(self.path, f"{missing} pages of the snapshot are missing from it{why}")
        try:
            for pack in loc.pack_ids:
                loc.fds.append(
                    os.open(self.path / PACKS / f"{pack}.pack", os.O_RDONLY | os.O_CLOEXEC)
                )
        except OSError as e:
            loc.close()
            raise _bad(self.path, f"cannot open a pack: {e.strerror}") from None
        return loc

    # --- gc and du -------------------------------------------------------------------------

    def refs(self) -> list[dict[str, Any]]:
        """Every registration with its `state`: "live" (its directory holds it), "dead" (the
        directory is gone or holds another snapshot) or "unknown" (the directory, its
        manifest or the registration cannot be read: kept, never guessed dead), and `why`."""
        from . import format as fmt

        out = []
        for p in sorted((self.path / REFS).glob("*.json")):
            if p.name.startswith("."):
                continue
            ref: dict[str, Any] = {"snapshot": p.stem, "file": p}
            try:
                doc = json.loads(_read_bounded(p, MAX_REF_JSON))
                if not isinstance(doc, dict) or doc.get("snapshot") != p.stem:
                    raise ValueError
                ref.update(path=str(doc["path"]), created=doc.get("created"),
                           map=dict(doc["map"]), pages=int(doc["pages"]))  # fmt: skip
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, SnapshotError):
                ref.update(state="unknown", why="its registration is unreadable")
                out.append(ref)
                continue
            live, why = fmt.holds_store_snapshot(Path(ref["path"]), self.path, p.stem)
            ref["state"] = ("unknown" if why else "live") if live else "dead"
            ref["why"] = why
            out.append(ref)
        return out

    def _map_of(self, ref: dict, verify: bool = True) -> list[tuple[int, bytes]] | None:
        """A registration's page map; checked against the registration when it has one, else
        (`verify=False`) only against the map's own checksum."""
        path = self.path / REFS / f"{ref['snapshot']}.map"
        try:
            if verify:
                size = ref["map"]["size"]
                if not isinstance(size, int) or not 0 < size <= MAX_MAP_BYTES:
                    return None
                data = _read_bounded(path, size)
                if len(data) != size or hashlib.sha256(data).hexdigest() != ref["map"]["sha256"]:
                    return None
            else:
                data = _read_bounded(path, MAX_MAP_BYTES)
            return unpack_map(data)[0]
        except (OSError, SnapshotError, KeyError, TypeError):
            return None

    def usage(self) -> dict[str, Any]:
        """What `kvmpy store du` shows. Call under `lock()`."""
        refs = self.refs()
        counts: dict[bytes, int] = {}
        maps = {}
        logical = 0
        for ref in refs:
            if ref["state"] == "dead":
                continue
            recs = self._map_of(ref, verify="map" in ref)
            if recs is None:
                continue
            maps[ref["snapshot"]] = recs
            if ref["state"] == "live":
                logical += len(recs)
            for d in {d for _, d in recs}:
                counts[d] = counts.get(d, 0) + 1
        snaps = []
        for ref in refs:
            recs = maps.get(ref["snapshot"])
            why = ref.get("why")
            if ref["state"] == "live" and recs is None:
                why = "its page map is unreadable"
            snaps.append({
                "snapshot": ref["snapshot"], "path": ref.get("path"),
                "created": ref.get("created"), "state": ref["state"], "why": why,
                "pages": len(recs) if recs is not None else ref.get("pages"),
                "unique_pages": len({d for _, d in recs if counts[d] == 1}) if recs else 0,
            })  # fmt: skip
        stored = 0
        damaged = []
        for pack in self.packs():
            try:
                stored += len(self.read_pack_index(pack))
            except SnapshotError as e:
                damaged.append({"pack": pack, "why": str(e)})
        disk, pack_bytes, map_bytes, uncommitted = 0, 0, 0, 0
        committed = set(self.packs())
        for f in self.path.rglob("*"):
            if f.is_file():
                b = f.stat().st_blocks * 512
                disk += b
                if f.suffix in (".pack", ".idx"):
                    pack_bytes += b
                    if f.suffix == ".pack" and f.stem not in committed:
                        uncommitted += 1
                elif f.parent.name == REFS:
                    map_bytes += b
        needed = len(counts)
        return {
            "store": str(self.path),
            "snapshots": snaps,
            "live_snapshots": sum(s["state"] == "live" for s in snaps),
            "dead_snapshots": sum(s["state"] == "dead" for s in snaps),
            "unknown_snapshots": sum(s["state"] == "unknown" for s in snaps),
            "logical_pages": logical,
            "logical_bytes": logical * PAGE_SIZE,
            "stored_pages": stored,
            "needed_pages": needed,
            "garbage_pages": max(0, stored - needed),
            "uncommitted_packs": uncommitted,
            "disk_bytes": disk,
            "pack_bytes": pack_bytes,
            "map_bytes": map_bytes,
            "saved_bytes": logical * PAGE_SIZE - disk,
            "dedup_ratio": round(logical / needed, 3) if needed else None,
            "damaged_packs": damaged,
        }

    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Remove what no snapshot needs: registrations of deleted or replaced snapshots,
        their pages, packs that never committed, temporary files; repack packs that are partly
        garbage. Call under `lock(exclusive=True)`."""
        refs = self.refs()
        needed: set[bytes] = set()
        dropped, kept = [], []
        for ref in refs:
            if ref["state"] == "dead":
                dropped.append(ref)
                continue
            recs = self._map_of(ref, verify="map" in ref)
            if recs is None and ref["state"] == "live":
                raise SnapshotError(
                    f"the page map of snapshot {ref['snapshot']} ({ref.get('path')}) in "
                    f"{self.path} is unreadable; gc cannot tell which pages it needs, so it "
                    "removed nothing (delete that snapshot first)"
                )
            if ref["state"] == "unknown":
                kept.append({"snapshot": ref["snapshot"], "path": ref.get("path"),
                             "why": ref.get("why")})  # fmt: skip
            needed.update(d for _, d in recs or ())
        removed_pages = repacked = freed = 0
        seen: set[bytes] = set()
        plan = []
        for pack in self.packs():
            try:
                digests = self.read_pack_index(pack)
            except SnapshotError as e:
                raise SnapshotError(f"{e}; gc removes nothing from a damaged store") from None
            keep = [i for i, d in enumerate(digests) if d in needed and d not in seen]
            seen.update(digests[i] for i in keep)
            plan.append((pack, digests, keep))
        files: list[Path] = []
        for pack, digests, keep in plan:
            if len(keep) == len(digests):
                continue
            removed_pages += len(digests) - len(keep)
            files += [self.path / PACKS / f"{pack}.pack", self.path / PACKS / f"{pack}.idx"]
            if keep and not dry_run:
                self._repack(pack, digests, keep)
                repacked += 1
        committed = set(self.packs())
        for f in (self.path / PACKS).iterdir():
            if f.name.startswith(".") or (f.suffix == ".pack" and f.stem not in committed):
                files.append(f)  # a write that never finished
        for f in (self.path / REFS).iterdir():
            if f.name.startswith(".") or (
                f.suffix == ".map" and not f.with_suffix(".json").exists()
            ):
                files.append(f)
        for ref in dropped:
            files += [ref["file"], self.path / REFS / f"{ref['snapshot']}.map"]
        for f in dict.fromkeys(files):
            with contextlib.suppress(FileNotFoundError):
                freed += f.stat().st_blocks * 512
                if not dry_run:
                    f.unlink()
        if not dry_run:
            for d in (PACKS, REFS):
                _fsync_dir(self.path / d)
            self._index = None
        return {
            "store": str(self.path),
            "dry_run": dry_run,
            "snapshots_dropped": [
                {"snapshot": r["snapshot"], "path": r.get("path"), "why": r.get("why")}
                for r in dropped
            ],  # fmt: skip
            "snapshots_kept_unknown": kept,
            "pages_removed": removed_pages,
            "packs_repacked": repacked,
            "bytes_freed": freed,
        }

    def _repack(self, pack: str, digests: list[bytes], keep: list[int]) -> None:
        """Copy the kept pages of `pack` into a new pack (checking each), commit it; the old
        one is removed by the caller. A crash in between leaves both: duplicates, harmless."""
        src = os.open(self.path / PACKS / f"{pack}.pack", os.O_RDONLY | os.O_CLOEXEC)
        new = uuid.uuid4().hex
        dst_path = self.path / PACKS / f"{new}.pack"
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            out = []
            for i in keep:
                page = os.pread(src, PAGE_SIZE, i * PAGE_SIZE)
                if len(page) != PAGE_SIZE or _sha(page) != digests[i]:
                    raise _bad(self.path, f"page {i} of pack {pack} is corrupted (its checksum "
                                          "does not match)")  # fmt: skip
                os.write(dst, page)
                out.append(digests[i])
            os.fsync(dst)
            _write_new(self.path / PACKS / f"{new}.idx", pack_index(out))
        except BaseException:
            with contextlib.suppress(OSError):
                dst_path.unlink()
            raise
        finally:
            os.close(src)
            os.close(dst)


def _ID_OK(snap: Any) -> bool:
    return isinstance(snap, str) and len(snap) == 32 and all(c in "0123456789abcdef" for c in snap)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views[0] = views[0][n:]


# --- reading pages -------------------------------------------------------------------------------


def read_memory(memory, loc: Located, store: Path) -> int:
    """Eager restore: read every page of `loc` into guest memory, checking each SHA-256."""
    from . import memfile

    def load(run: tuple[int, int, int, int]) -> int:
        i, n, pack, slot = run
        view = memfile.locate(memory, loc.pages[i], n)
        got = os.preadv(loc.fds[pack], [view], slot * PAGE_SIZE)
        if got != n * PAGE_SIZE:
            raise _bad(store, f"pack {loc.pack_ids[pack]} is truncated")
        for k in range(n):
            if _sha(view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]) != loc.digests[i + k]:
                raise SnapshotError(
                    f"the page store {store} is corrupted: page {slot + k} of pack "
                    f"{loc.pack_ids[pack]} (guest page {loc.pages[i + k]}) does not match its "
                    "checksum"
                )
        return n

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return sum(pool.map(load, loc.runs()))


def lazy_records(loc: Located) -> bytes:
    return b"".join(
        LAZY_RECORD.pack(p, k, s, d)
        for p, k, s, d in zip(loc.pages, loc.pack, loc.slot, loc.digests, strict=True)
    )


__all__ = ["Located", "PageStore", "read_memory"]

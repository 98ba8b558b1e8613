"""Device I/O threads: queue work runs off the notifying thread, and two busy devices with
their own threads progress in parallel (the seeds' "parallel xenwatch")."""

from __future__ import annotations

import threading
import time

from kvmpy.devices.virtio import block as B
from kvmpy.devices.virtio.driver import Arena, MmioRegs, start
from kvmpy.devices.virtio.mmio import VirtioMmio
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.memory import GuestMemory
from kvmpy.vmm.event_loop import EventLoop

N = 250


def busy_pair(tmp_path, shared: bool):
    mem = GuestMemory()
    mem.add_region(0, 64 << 20)
    mem.fill(0, 64 << 20)  # first touch here, not inside the measurement
    done: dict[str, list[float]] = {"a": [], "b": []}
    threads: dict[str, set[str]] = {"a": set(), "b": set()}
    shared_loop = EventLoop("virtio-shared") if shared else None
    loops, devs = [], []
    for k, name in enumerate(("a", "b")):
        img = tmp_path / f"{name}.img"
        img.write_bytes(bytes(8 << 20))
        dev = B.VirtioBlock(str(img), name=name)
        loop = shared_loop or EventLoop(f"virtio-{name}")
        if loop not in loops:
            loops.append(loop)
        dev.use_loop(loop)

        def timed(chain, orig=dev._request, name=name):
            n = orig(chain)
            done[name].append(time.perf_counter())
            threads[name].add(threading.current_thread().name)
            return n

        dev._request = timed
        t = VirtioMmio(dev, mem, CallbackIrq())
        (q,) = start(MmioRegs(t), Arena(mem, (1 + k) << 20, 1 << 20), 1)
        # Each request reads 1 MiB (the largest request) into one buffer per device: the
        # copies run in preadv with the GIL released, so two threads can overlap for real.
        base = (4 + 30 * k) << 20
        buf = base + (8 << 20)
        for i in range(N):
            hdr = base + i * 0x1000
            mem.write(hdr, B._HEADER.pack(B.T_IN, 0, (i % 8) * 2048))
            q.add([(hdr, 16)], [(buf, 1 << 20), (hdr + 0x100, 1)], indirect_at=hdr + 0x200)
        devs.append((dev, t))
    for loop in loops:
        loop.start()
    for dev, _ in devs:
        dev.notify(0)  # from this thread (a vCPU's role): only schedules the work
    deadline = time.time() + 30
    while time.time() < deadline and min(len(v) for v in done.values()) < N:
        time.sleep(0.01)
    for loop in loops:
        loop.stop()
    for _, t in devs:
        t.close()
    mem.close()
    return done, threads


def test_queue_work_runs_on_the_io_thread(tmp_path):
    done, threads = busy_pair(tmp_path, shared=False)
    assert threads == {"a": {"virtio-a"}, "b": {"virtio-b"}}
    assert len(done["a"]) == len(done["b"]) == N


def test_two_busy_devices_progress_in_parallel(tmp_path):
    """With a thread each, both devices complete requests while the other is still busy; with
    one shared thread, one device's queue is drained before the other's starts."""

    def interleaved(done):
        a, b = done["a"], done["b"]
        return sum(a[0] < t < a[-1] for t in b) + sum(b[0] < t < b[-1] for t in a)

    own, _ = busy_pair(tmp_path, shared=False)
    shared, _ = busy_pair(tmp_path, shared=True)
    assert interleaved(shared) == 0
    assert interleaved(own) > N // 4


def test_rng_rate_limit_waits_on_a_timer():
    from kvmpy.devices.virtio.rng import VirtioRng

    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    rng = VirtioRng(rate=8192)  # bytes per second; the bucket starts full
    loop = EventLoop("virtio-rng")
    rng.use_loop(loop)
    t = VirtioMmio(rng, mem, CallbackIrq())
    (q,) = start(MmioRegs(t), Arena(mem, 1 << 20, 1 << 20), 1)
    loop.start()
    try:
        for i in range(16):
            q.add([], [(0x200000 + i * 0x2000, 4096)])
        t0 = time.perf_counter()
        rng.notify(0)
        got, sizes = 0, []
        while got < 4 * 4096 and time.perf_counter() - t0 < 10:
            used = q.take_used()
            sizes += [n for _, n in used]
            got += sum(n for _, n in used)
            time.sleep(0.01)
        got = min(got, 4 * 4096)
        elapsed = time.perf_counter() - t0
    finally:
        loop.stop()
        t.close()
        mem.close()
    assert got == 4 * 4096 and min(sizes) >= 1024
    # 8 KiB came from the full bucket at once; the other 8 KiB needed about a second (the
    # device may fill a buffer partly: it got at least 1 KiB at a time).
    assert 0.7 < elapsed < 5


def test_console_reads_input_from_a_pipe_on_its_thread():
    import os

    from kvmpy.devices.virtio.console import VirtioConsole

    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    r, w = os.pipe()
    con = VirtioConsole(input_fd=r)
    loop = EventLoop("virtio-console")
    con.use_loop(loop)
    t = VirtioMmio(con, mem, CallbackIrq())
    loop.start()
    try:
        rx, _ = start(MmioRegs(t), Arena(mem, 1 << 20, 1 << 20), 2)
        rx.add([], [(0x200000, 64)])
        os.write(w, b"typed on the host\n")
        deadline = time.time() + 5
        used = []
        while not used and time.time() < deadline:
            used = rx.take_used()
            time.sleep(0.01)
    finally:
        loop.stop()
        t.close()
        os.close(r)
        os.close(w)
    assert used == [(rx.size - 1, 18)]
    assert mem.read(0x200000, 18) == b"typed on the host\n"
    mem.close()


def test_snapshot_with_requests_in_flight(tmp_path):
    """A snapshot taken while the I/O thread is busy: device state and guest memory are taken
    together under quiesced(), and the restored device completes every request exactly once
    (the ones not yet served are served after the restore)."""
    import struct

    from kvmpy.vmm.virtio import VirtioSet

    img = tmp_path / "d.img"
    img.write_bytes(bytes(range(256)) * (1 << 14))  # 4 MiB
    mem = GuestMemory()
    mem.add_region(0, 32 << 20)
    dev = B.VirtioBlock(str(img))

    def slow(chain, orig=dev._request):  # a slow disk: the snapshot lands mid-queue
        time.sleep(0.0005)
        return orig(chain)

    dev._request = slow
    loop = EventLoop("virtio-vda")
    dev.use_loop(loop)
    t = VirtioMmio(dev, mem, CallbackIrq())
    vset = VirtioSet()
    vset.devices.append(dev)
    vset.transports.append(t)
    (q,) = start(MmioRegs(t), Arena(mem, 1 << 20, 1 << 20), 1)
    for i in range(N):
        hdr = (4 << 20) + i * 0x1000
        mem.write(hdr, B._HEADER.pack(B.T_IN, 0, (i % 64) * 128))
        q.add([(hdr, 16)], [(hdr + 0x400, 0x400), (hdr + 0x100, 1)], indirect_at=hdr + 0x200)
    loop.start()
    dev.notify(0)
    time.sleep(0.03)
    with vset.quiesced():
        state = vset.state()
        ram = mem.read(0, 32 << 20)
    loop.stop()
    t.close()
    done_before = struct.unpack_from("<H", ram, q.used + 2)[0]
    assert 0 < done_before < N
    # A new machine from the snapshot: memory, then the device.
    mem2 = GuestMemory()
    mem2.add_region(0, 32 << 20)
    mem2.write(0, ram)
    dev2 = B.VirtioBlock(str(img))
    t2 = VirtioMmio(dev2, mem2, CallbackIrq())
    vset2 = VirtioSet()
    vset2.devices.append(dev2)
    vset2.transports.append(t2)
    vset2.restore_state(state)
    dev2.notify(0)  # the driver's next notify (inline: no loop)
    q.memory = mem2
    used = q.take_used()
    assert len(used) == N  # every request completed exactly once across the two devices
    assert dev2.requests == N - done_before
    for i in range(N):
        hdr = (4 << 20) + i * 0x1000
        assert mem2.read(hdr + 0x100, 1) == b"\0"
        assert mem2.read(hdr + 0x400, 0x400) == (bytes(range(256)) * 4)
    t2.close()
    mem.close()
    mem2.close()

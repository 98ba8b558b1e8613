"""virtio-console (VIRTIO 1.2, 5.3) with one port: receiveq0 (host -> guest) and transmitq0
(guest -> host). No MULTIPORT, no emergency write; the config space holds the size (cols, rows).

Output goes to `sink(bytes)` (the machine's console: stdout, captured output). Input comes from
`feed(bytes)` (any thread) or from a file descriptor the I/O loop reads (`input_fd`, e.g.
stdin); it waits in a bounded buffer until the guest posts receive buffers, and what does not
fit is dropped and counted, so a guest that never reads cannot make the VMM buffer without
bound.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable

from .constants import ID_CONSOLE
from .device import VirtioDevice
from .queue import Virtqueue

QUEUE_SIZE = 128
RX, TX = 0, 1
INPUT_LIMIT = 64 * 1024
#: A guest can hand us huge transmit buffers; take at most this much of one at a time.
MAX_TX_CHUNK = 64 * 1024


class VirtioConsole(VirtioDevice):
    device_id = ID_CONSOLE

    def __init__(
        self,
        name: str = "console0",
        sink: Callable[[bytes], None] | None = None,
        input_fd: int | None = None,
        cols: int = 80,
        rows: int = 25,
    ):
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE])
        self.sink = sink
        self.input_fd = input_fd
        self.cols, self.rows = cols, rows
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self._reading = False
        self.bytes_out = 0
        self.bytes_in = 0
        self.dropped_in = 0

    def config_bytes(self) -> bytes:
        # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)

    # --- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue input for the guest (any thread)."""
        with self._input_lock:
            room = INPUT_LIMIT - len(self._input)
            self._input += data[: max(0, room)]
            self.dropped_in += max(0, len(data) - max(0, room))
        self.notify(RX)

    def push_input(self, data: bytes) -> int:
        """Queue what fits of `data`; returns how much was taken (the caller keeps the rest:
        a console backend that holds input until there is room, vmm/console.py)."""
        with self._input_lock:
            room = INPUT_LIMIT - len(self._input)
            taken = bytes(data[: max(0, room)])
            self._input += taken
        if taken:
            self.notify(RX)
        return len(taken)

    @property
    def accepting_input(self) -> bool:
        return self.running

    def activate(self) -> None:
        if self.input_fd is not None and self.loop is not None and not self._reading:
            self._reading = True
            self.loop.add_reader(self.input_fd, self._on_input)

    def _on_input(self) -> None:
        try:
            data = os.read(self.input_fd, 4096)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of input: stop watching
            if self.loop is not None and self.input_fd is not None:
                self.loop.remove_reader(self.input_fd)
            self._reading = False
            return
        self.feed(data)

    # --- queues --------------------------------------------------------------------------

    def handle(self, q: Virtqueue) -> None:
        if q.index == TX:
            self._transmit(q)
        elif q.index == RX:
            self._receive(q)

    def _transmit(self, q: Virtqueue) -> None:
        pushed = False
        while True:
            chain = self.next_chain(q)
            if chain is None:
                break
            n = chain.readable_len
            for off in range(0, n, MAX_TX_CHUNK):
                data = chain.read(MAX_TX_CHUNK, off)
                self.bytes_out += len(data)
                if self.sink is not None:
                    self.sink(data)
            self.requests += 1
            q.push(chain, 0)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _receive(self, q: Virtqueue) -> None:
        pushed = False
        with self._input_lock:
            while self._input:
                chain = self.next_chain(q)
                if chain is None:
                    break
                n = chain.write(bytes(self._input[: chain.writable_len]))
                del self._input[:n]
                self.bytes_in += n
                self.requests += 1
                q.push(chain, n)
                pushed = True
        if pushed:
            self.signal_used(q)

    def on_reset(self) -> None:
        if self._reading and self.loop is not None and self.input_fd is not None:
            self.loop.remove_reader(self.input_fd)
        self._reading = False

    def stats(self) -> dict:
        return {
            **super().stats(),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "dropped_in": self.dropped_in,
        }

    def device_state(self) -> dict:
        with self._input_lock:
            return {"input": self._input.hex()}

    def restore_device_state(self, state: dict) -> None:
        with self._input_lock:
            self._input = bytearray(bytes.fromhex(state.get("input", "")))[:INPUT_LIMIT]

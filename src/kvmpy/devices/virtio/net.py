"""virtio-net (VIRTIO 1.2, 5.1): one receive and one transmit queue over a host backend (a
TAP device, devices/virtio/tap.py), served by the device's I/O thread.

Every frame carries struct virtio_net_hdr_v1 (12 bytes; VERSION_1 makes num_buffers part of
it), which is also the TAP's IFF_VNET_HDR layout: transmit chains go to the TAP with one
writev straight from guest RAM; received frames are read from the TAP into one bounce
buffer and copied into the guest's receive buffers (a frame's size is only known once read).

Features offered: MAC, STATUS (link up/down, `set_link()`), MRG_RXBUF, and, only when the
backend implements them end to end (a TAP: the host kernel finishes partial checksums and
segments GSO frames), CSUM, GUEST_CSUM, HOST_TSO4/6/ECN, GUEST_TSO4/6/ECN, with the feature
dependencies of 5.1.3.1 checked at FEATURES_OK. The receive offloads the guest accepted are
given to the TAP (TUNSETOFFLOAD) at DRIVER_OK, so the kernel only hands us frames the guest
can take. A transmitted header that asks for an offload the guest did not negotiate is a
bad frame: dropped and counted (the kernel would also refuse a malformed one: EINVAL).

Bounds. A frame is at most MAX_FRAME bytes (64 KiB of GSO payload plus headers) in either
direction; anything larger is dropped and counted. Frames read while the guest has no
receive buffers wait in a queue of at most RX_PENDING_FRAMES frames / RX_PENDING_BYTES;
beyond that they are read and dropped (`rx_dropped`), so a guest that stops taking frames
costs the VMM a bounded amount of memory and nothing else. Work per wake-up is bounded too
(BUDGET frames), so a flood in one direction cannot starve the other.
"""

from __future__ import annotations

import os
import struct
from collections import deque

from .constants import ID_NET, STATUS_DRIVER_OK
from .device import VirtioDevice
from .queue import Virtqueue
from .tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_LEN,
    NetBackend,
)

QUEUE_SIZE = 256
RX, TX = 0, 1

# 5.1.3 feature bits
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
OFFLOADS = (F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_HOST_TSO4
            | F_HOST_TSO6 | F_HOST_ECN)  # fmt: skip

# 5.1.4 config status
S_LINK_UP = 1

# 5.1.6 header
HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

#: The largest frame in either direction: header, Ethernet + VLAN header, 64 KiB of IP.
MAX_FRAME = VNET_HDR_LEN + 18 + 65535
RX_PENDING_FRAMES = 256
RX_PENDING_BYTES = 1 << 20
#: Frames per direction per wake-up of the I/O thread.
BUDGET = 256

_NUM_BUFFERS = struct.Struct("<H")

#: (feature, features it needs) from 5.1.3.1.
_DEPENDS = [
    (F_GUEST_TSO4, F_GUEST_CSUM),
    (F_GUEST_TSO6, F_GUEST_CSUM),
    (F_GUEST_ECN, F_GUEST_TSO4 | F_GUEST_TSO6),
    (F_HOST_TSO4, F_CSUM),
    (F_HOST_TSO6, F_CSUM),
    (F_HOST_ECN, F_HOST_TSO4 | F_HOST_TSO6),
]


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a MAC address (six hex bytes: 52:54:00:12:34:56)"
        ) from None
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address: a NIC needs a unicast one")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A locally administered unicast address (02:xx:...)."""
    return bytes([0x02, *os.urandom(5)])


class VirtioNet(VirtioDevice):
    device_id = ID_NET

    def __init__(self, backend: NetBackend, name: str = "net0", mac: bytes | None = None,
                 link_up: bool = True):  # fmt: skip
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE])
        self.backend = backend
        self.mac = bytes(mac) if mac is not None else random_mac()
        self.link_up = link_up
        self.device_features |= F_MAC | F_STATUS | F_MRG_RXBUF
        if backend.offloads:
            self.device_features |= OFFLOADS
        self._buf = bytearray(MAX_FRAME)
        self._bufview = memoryview(self._buf)
        self._pending: deque[bytearray] = deque()
        self._pending_bytes = 0
        self._watching = False
        self.rx_packets = self.rx_bytes = self.rx_dropped = 0
        self.tx_packets = self.tx_bytes = self.tx_dropped = 0
        self.tx_errors = 0

    # --- config and features ---------------------------------------------------------------

    def config_bytes(self) -> bytes:
        # struct virtio_net_config: mac, status, max_virtqueue_pairs
        return struct.pack("<6sHH", self.mac, S_LINK_UP if self.link_up else 0, 1)

    def accept_features(self, features: int) -> bool:
        return all(features & needs for feature, needs in _DEPENDS if features & feature)

    def set_link(self, up: bool) -> None:
        """Link status (config `status`, VIRTIO_NET_S_LINK_UP); the driver gets a
        configuration-change interrupt. While down, frames in both directions are dropped."""
        with self.lock:
            if up != self.link_up:
                self.link_up = up
                self.config_changed()

    def _tun_offloads(self) -> int:
        f = 0
        if self.has(F_GUEST_CSUM):
            f |= TUN_F_CSUM
            if self.has(F_GUEST_TSO4):
                f |= TUN_F_TSO4
            if self.has(F_GUEST_TSO6):
                f |= TUN_F_TSO6
            if self.has(F_GUEST_ECN):
                f |= TUN_F_TSO_ECN
        return f

    # --- life cycle ------------------------------------------------------------------------

    def activate(self) -> None:
        if self.backend.offloads:
            self.backend.set_offload(self._tun_offloads())
        if self.loop is not None and not self._watching:
            self._watching = True
            self.loop.add_reader(self.backend.fileno(), self._backend_readable)

    def _backend_readable(self) -> None:
        if not self.running:
            # Reset or broken: stop watching (level-triggered, it would wake us forever);
            # the next DRIVER_OK watches again.
            with self.lock:
                if self._watching and self.loop is not None:
                    self.loop.remove_reader(self.backend.fileno())
                self._watching = False
            return
        self.process(RX)

    def on_reset(self) -> None:
        if self._watching and self.loop is not None:
            self.loop.remove_reader(self.backend.fileno())
        self._watching = False
        self._pending.clear()
        self._pending_bytes = 0
        if self.backend.offloads:
            try:
                self.backend.set_offload(0)
            except OSError:
                pass

    def close(self) -> None:
        if self._watching and self.loop is not None:
            self.loop.remove_reader(self.backend.fileno())
            self._watching = False
        super().close()
        self.backend.close()

    # --- queues ----------------------------------------------------------------------------

    def handle(self, q: Virtqueue) -> None:
        if q.index == TX:
            self._transmit(q)
        elif q.index == RX:
            self._receive(q)

    def _tx_header_ok(self, first: memoryview, chain) -> bool:
        if len(first) >= 2:
            flags, gso = first[0], first[1]
            if not flags and not gso:
                return True  # no offload asked: the common case, decided without a copy
        else:
            flags, gso = chain.read(2)
        if flags & HDR_F_NEEDS_CSUM and not self.has(F_CSUM):
            return False
        kind = gso & ~GSO_ECN
        if kind == GSO_NONE:
            return not gso & GSO_ECN
        if gso & GSO_ECN and not self.has(F_HOST_ECN):
            return False
        if kind == GSO_TCPV4:
            return self.has(F_HOST_TSO4)
        if kind == GSO_TCPV6:
            return self.has(F_HOST_TSO6)
        return False  # UDP (UFO) and unknown types are not offered

    def _transmit(self, q: Virtqueue) -> None:
        # The hot path of guest -> host (measured: about 8 µs per 64-byte frame here, half of
        # it tun's write): one writev per frame straight from guest RAM, the used index
        # published once per batch, one interrupt check per batch.
        done: list[int] = []
        write = self.backend.write
        pop = q.pop_readable
        link_up = self.link_up
        while len(done) < BUDGET and not self.quiescing:
            got = pop()
            if got is None:
                if q.enable_notifications():
                    continue
                break
            head, item = got
            if isinstance(item, memoryview):
                iov, n, first = [item], len(item), item
            else:
                iov = item.readable
                n = item.readable_len
                first = iov[0] if iov else memoryview(b"")
            if (
                n <= VNET_HDR_LEN
                or n > MAX_FRAME
                or not link_up
                or not self._tx_header_ok(first, item)
            ):
                self.tx_dropped += 1
            else:
                try:
                    write(iov)
                    self.tx_packets += 1
                    self.tx_bytes += n - VNET_HDR_LEN
                except OSError:
                    # EINVAL: a header tun refused; EIO: the interface is down; ENOBUFS...
                    self.tx_errors += 1
                    self.tx_dropped += 1
            done.append(head)
        if done:
            q.push_heads(done)
            self.requests += len(done)
            self.signal_used(q)
            if len(done) >= BUDGET and self.loop is not None:
                self.loop.call_soon(lambda: self.process(TX))  # more may be waiting

    def _receive(self, q: Virtqueue) -> None:
        """Hand waiting frames to the guest, then read the backend until it is empty (or
        the budget is spent)."""
        delivered = 0
        pending = self._pending
        mrg = self.has(F_MRG_RXBUF)
        while pending:
            frame = pending[0]
            r = self._deliver(q, frame, mrg)
            if r == _NO_BUFFERS:
                break
            pending.popleft()
            self._pending_bytes -= len(frame)
            delivered += r == _DELIVERED
        read = self.backend.read_into
        view = self._bufview
        for _ in range(BUDGET):
            n = read(self._buf)
            if n is None:
                break
            if n <= VNET_HDR_LEN or not self.link_up:
                self.rx_dropped += 1
                continue
            if n > MAX_FRAME:  # pragma: no cover - the buffer is MAX_FRAME long
                self.rx_dropped += 1
                continue
            if not pending:
                r = self._deliver(q, view[:n], mrg)
                if r != _NO_BUFFERS:
                    delivered += r == _DELIVERED
                    continue
            if len(pending) < RX_PENDING_FRAMES and self._pending_bytes + n <= RX_PENDING_BYTES:
                pending.append(bytearray(view[:n]))
                self._pending_bytes += n
            else:
                self.rx_dropped += 1
        else:
            if self.loop is not None:
                self.loop.call_soon(lambda: self.process(RX))  # the budget ran out
        if delivered:
            self.signal_used(q)

    def _deliver(self, q: Virtqueue, frame, mrg: bool) -> int:
        """Copy one frame (header included) into the guest's receive buffers."""
        n = len(frame)
        if not mrg:
            chain = self.next_chain(q)
            if chain is None:
                return _NO_BUFFERS
            if chain.writable_len < n:
                q.unpop(1)  # keep the buffer for a frame that fits; this one is lost
                self.rx_dropped += 1
                return _DROPPED
            _NUM_BUFFERS.pack_into(frame, 10, 1)
            chain.write(frame)
            q.push(chain, n)
        else:
            chains = []
            room = 0
            while room < n:
                chain = self.next_chain(q)
                if chain is None:
                    if chains:
                        q.unpop(len(chains))
                    # All of the ring is not enough: the frame can never fit.
                    if len(chains) >= q.size:
                        self.rx_dropped += 1
                        return _DROPPED
                    return _NO_BUFFERS
                chains.append(chain)
                room += chain.writable_len
            _NUM_BUFFERS.pack_into(frame, 10, len(chains))
            done = 0
            for chain in chains:
                k = chain.write(frame[done:])
                done += k
                q.push(chain, k)
        self.rx_packets += 1
        self.rx_bytes += n - VNET_HDR_LEN
        self.requests += 1
        return _DELIVERED

    # --- stats and snapshots ---------------------------------------------------------------

    def stats(self) -> dict:
        return {
            **super().stats(),
            "backend": self.backend.name,
            "mac": format_mac(self.mac),
            "link_up": self.link_up,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "rx_dropped": self.rx_dropped,
            "rx_pending": len(self._pending),
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "tx_dropped": self.tx_dropped,
            "tx_errors": self.tx_errors,
        }

    def device_state(self) -> dict:
        # Frames waiting for receive buffers are not saved: a network drops frames anyway.
        return {"mac": format_mac(self.mac), "link_up": self.link_up}

    def restore_device_state(self, state: dict) -> None:
        if "mac" in state:
            try:
                self.mac = parse_mac(str(state["mac"]))
            except ValueError:
                pass
        self.link_up = bool(state.get("link_up", True))

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        with self.lock:
            if self.status & STATUS_DRIVER_OK and self.broken is None:  # the backend again
                self.activate()


_DELIVERED, _NO_BUFFERS, _DROPPED = 0, 1, 2

"""Host backends of virtio-net: a TAP device through /dev/net/tun, or a datagram socket.

Frames cross the backend with the 12-byte virtio_net_hdr_v1 in front (`IFF_VNET_HDR` with
TUNSETVNETHDRSZ 12), the layout the guest uses with VIRTIO_F_VERSION_1, so guest transmit
chains go to the TAP with one writev straight from guest RAM and the checksum and
segmentation fields pass through untouched: the host kernel (tun's virtio_net_hdr_to_skb)
finishes partial checksums and segments GSO frames, and TUNSETOFFLOAD tells it which of them
the guest accepted on receive. The descriptor is non-blocking: the device's I/O thread reads
until EAGAIN and never waits on it.

    tap = TapBackend.open("tap0")        # an existing TAP (or a new one, when root)
    tap = TapBackend.open("auto")        # kvmpy's own kvtapN, removed when closed
    tap.read_into(buf) -> n | None       # one frame (header included); None: nothing waiting
    tap.write(iov) -> n                  # one frame

`SocketBackend` carries the same framing over a SOCK_DGRAM socket (one datagram per frame):
tests, fuzzing and machines without /dev/net/tun use it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
from typing import Protocol

from ...errors import ConfigError

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
#: The header every frame carries: struct virtio_net_hdr_v1 (VIRTIO 1.2, 5.1.6).
VNET_HDR_LEN = 12

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_UP = 0x1
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921

#: The name pattern of TAPs kvmpy creates for `tap=auto` (the kernel fills in the number).
AUTO_PATTERN = "kvtap%d"
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_IFREQ = struct.Struct("16sH22x")


class NetBackend(Protocol):
    name: str
    #: The backend can take and give frames with partial checksums and GSO.
    offloads: bool

    def fileno(self) -> int: ...

    def read_into(self, buf: bytearray | memoryview) -> int | None: ...

    def write(self, iov: list[memoryview] | list[bytes]) -> int: ...

    def set_offload(self, flags: int) -> None: ...

    def close(self) -> None: ...


def check_ifname(name: str) -> str:
    if not _IFNAME.match(name):
        raise ConfigError(f"{name!r} is not an interface name (1-15 letters, digits, '_.:-')")
    return name


class TapBackend:
    """A TAP device opened through /dev/net/tun (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)."""

    offloads = True

    def __init__(self, fd: int, name: str, created: bool):
        self.fd = fd
        self.name = name
        #: kvmpy created the interface (tap=auto, or a name that did not exist): it goes away
        #: when the descriptor closes (not TUNSETPERSIST).
        self.created = created

    @classmethod
    def open(cls, name: str) -> TapBackend:
        """Attach to TAP `name`, or create one: `auto` asks the kernel for a fresh kvtapN
        (root, or CAP_NET_ADMIN). The interface is brought up if it is down and we may."""
        auto = name == "auto"
        if not auto:
            check_ifname(name)
        existed = auto is False and os.path.exists(f"/sys/class/net/{name}")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"--net tap={name}: cannot open {TUN_PATH}: {e.strerror}") from None
        try:
            req = _IFREQ.pack((AUTO_PATTERN if auto else name).encode(),
                              IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)  # fmt: skip
            try:
                got = fcntl.ioctl(fd, TUNSETIFF, req)
            except OSError as e:
                hint = ""
                if e.errno == errno.EPERM:
                    hint = " (creating a TAP needs root; or create it first: ip tuntap add dev NAME mode tap user $USER)"
                elif e.errno == errno.EBUSY:
                    hint = " (another process has it open)"
                elif e.errno == errno.EINVAL:
                    hint = " (is it a TUN device, or a TAP without IFF_VNET_HDR support?)"
                raise ConfigError(
                    f"--net tap={name}: TUNSETIFF failed: {e.strerror}{hint}"
                ) from None
            ifname = _IFREQ.unpack(got)[0].split(b"\0", 1)[0].decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            # No offloads until the guest accepts them (virtio-net sets them at DRIVER_OK).
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except BaseException:
            os.close(fd)
            raise
        tap = cls(fd, ifname, created=auto or not existed)
        tap.bring_up()
        return tap

    def bring_up(self) -> None:
        """IFF_UP: tun refuses writes (EIO) to an interface that is down."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = _IFREQ.pack(self.name.encode(), 0)
            try:
                flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
                if not flags & IFF_UP:
                    fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(self.name.encode(), flags | IFF_UP))
            except OSError as e:
                log.warning("%s is down and cannot be brought up (%s): frames to it fail "
                            "until it is up (ip link set %s up)", self.name, e.strerror,
                            self.name)  # fmt: skip

    def fileno(self) -> int:
        return self.fd

    def read_into(self, buf) -> int | None:
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return None

    def write(self, iov) -> int:
        return os.writev(self.fd, iov)

    def set_offload(self, flags: int) -> None:
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def mtu(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            got = fcntl.ioctl(s, SIOCGIFMTU, _IFREQ.pack(self.name.encode(), 0))
            return struct.unpack_from("i", got, 16)[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SocketBackend:
    """Frames (header included) as datagrams on a socket: `SocketBackend.pair()` gives the
    backend and the peer a test or the fuzzer plays the host network with."""

    offloads = False

    def __init__(self, sock: socket.socket, name: str = "socket"):
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.offload_flags = 0

    @classmethod
    def pair(cls, name: str = "socket") -> tuple[SocketBackend, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return cls(a, name), b

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_into(self, buf) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None

    def write(self, iov) -> int:
        return self.sock.sendmsg(iov)

    def set_offload(self, flags: int) -> None:
        self.offload_flags = flags

    def close(self) -> None:
        self.sock.close()

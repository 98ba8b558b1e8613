"""Numbers from the VIRTIO 1.2 specification (OASIS, virtio-v1.2-cs01), by section."""

from __future__ import annotations

# 2.1 Device status field
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# 6 Reserved feature bits
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34
F_IN_ORDER = 1 << 35
F_ORDER_PLATFORM = 1 << 36
F_SR_IOV = 1 << 37
F_NOTIFICATION_DATA = 1 << 38
F_RING_RESET = 1 << 40

# 2.7.5 The virtqueue descriptor table
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# 2.7.6 / 2.7.8 ring flags
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

#: 2.7: the largest split queue (Queue Size is a 16-bit power of two no larger than this).
MAX_QUEUE_SIZE = 32768

# 5 Device IDs
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_ENTROPY = 4
ID_BALLOON = 5
ID_VSOCK = 19

DEVICE_NAMES = {
    ID_NET: "net",
    ID_BLOCK: "block",
    ID_CONSOLE: "console",
    ID_ENTROPY: "entropy",
    ID_BALLOON: "balloon",
    ID_VSOCK: "vsock",
}

#: Interrupt reasons (virtio-mmio InterruptStatus bits, virtio-pci ISR bits).
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

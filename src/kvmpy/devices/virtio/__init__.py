"""VirtIO 1.2 devices (modern only): the split virtqueue and device core, the virtio-mmio
and virtio-pci transports, and console, block and entropy devices. See docs/virtio.md."""

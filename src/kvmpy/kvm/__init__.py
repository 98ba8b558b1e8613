"""Thin bindings to /dev/kvm: one class per file descriptor, named after the kernel API.

This package is the only place that knows ioctl numbers and structure layouts; everything above
it speaks in terms of the machine (memory, vCPU, device).
"""

from . import constants, structs
from .constants import Cap, ExitReason
from .system import Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = ["Cap", "ExitReason", "Kvm", "VcpuFd", "VmFd", "constants", "structs"]

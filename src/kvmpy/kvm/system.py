"""`Kvm`: the /dev/kvm system file descriptor."""

from __future__ import annotations

import errno
import os

from ..errors import KvmError, KvmUnavailable
from . import constants as K
from . import structs as S
from ._sys import ioctl
from .vm import VmFd

DEFAULT_PATH = "/dev/kvm"


def default_path() -> str:
    """/dev/kvm, or $KVMPY_DEV (handy for tests and unusual setups)."""
    return os.environ.get("KVMPY_DEV") or DEFAULT_PATH


class Kvm:
    """An open /dev/kvm. Methods are named after the system ioctls."""

    def __init__(self, path: str | None = None):
        self.path = path = path or default_path()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "or run on a host with hardware virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} is not accessible to this user: add yourself to the 'kvm' group "
                f"(sudo usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            version = self.api_version()
        except KvmError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device ({e.strerror})") from None
        if version != K.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(
                f"{path} speaks KVM API version {version}, kvmpy needs {K.KVM_API_VERSION}"
            )
        self._mmap_size: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def api_version(self) -> int:
        return ioctl(self.fd, K.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, K.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def create_vm(self, vm_type: int = 0) -> VmFd:
        fd = ioctl(self.fd, K.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        return VmFd(fd, self)

    def supported_cpuid(self, max_entries: int = 256) -> list[S.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID; grows the buffer while the kernel says E2BIG."""
        return self._get_cpuid(K.KVM_GET_SUPPORTED_CPUID, max_entries, "KVM_GET_SUPPORTED_CPUID")

    def _get_cpuid(self, request: int, n: int, name: str) -> list[S.kvm_cpuid_entry2]:
        while True:
            buf = S.cpuid2_buffer(n)
            try:
                ioctl(self.fd, request, buf, name)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM must save and restore."""
        return self._msr_list(K.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list(K.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, request: int, name: str) -> list[int]:
        probe = S.kvm_msr_list()
        try:
            ioctl(self.fd, request, probe, name)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        buf = S.msr_list_buffer(probe.nmsrs)
        ioctl(self.fd, request, buf, name)
        return list(buf.indices[: buf.nmsrs])

    def cpuid_supports_1g_pages(self) -> bool:
        for e in self.supported_cpuid():
            if e.function == 0x80000001:
                return bool(e.edx & (1 << 26))
        return False

"""Kernel same-page merging (KSM): the host's settings, what each VM shares, and the lab.

With KVM the merging is the host kernel's: ksmd scans memory marked MADV_MERGEABLE, merges
identical pages into one write-protected copy, and a write to a merged page takes a private
copy again (copy-on-write). kvmpy offers guest RAM to it (`MachineConfig(mergeable=True)`,
`kvmpy run --mergeable`), steers it (`sysfs.py`, `kvmpy ksm`), reports what each VM shares
(`usage.py`, `kvmpy ctl SOCK stats`) and measures it (`lab.py`, `kvmpy lab ksm`). docs/memory.md
has the figures.
"""

from ..errors import KvmpyError


class KsmError(KvmpyError):
    """KSM cannot be read or steered here: no KSM in this kernel, not root, a value the
    kernel refuses."""


__all__ = ["KsmError"]

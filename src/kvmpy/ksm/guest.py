"""The `ksm-fill` example guest (guest/examples/ksm-fill.c): its parameters and its protocol.

It fills memory after its image with pages identical in every VM, nearly identical ones (the
same but for one word) and distinct ones, then times passes over them, reporting each step to
the lab through the SYNC hypercall (kvmpy.ksm.labvm registers it) and waiting there until the
lab lets it go on.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

from ..errors import BadImage, ConfigError
from ..memory import PAGE_SIZE

SYMBOL = "ksmfill_params"
MAGIC = 0x31764C49464D534B  # "KSMFILv1"
_LAYOUT = struct.Struct("<7Q")

#: The lab's hypercall number (outside the base ABI's 0-6).
HC_SYNC = 0x4B534D01
STEP_FILLED, STEP_BASELINE, STEP_MERGED, STEP_REFERENCE = 1, 2, 3, 4
STEPS = {
    STEP_FILLED: "filled",
    STEP_BASELINE: "baseline",
    STEP_MERGED: "merged",
    STEP_REFERENCE: "reference",
}


@dataclass(frozen=True)
class FillParams:
    vm_id: int = 0
    seed: int = 0x6B736D2D66696C6C
    identical_pages: int = 1024
    partial_pages: int = 256
    distinct_pages: int = 256
    timed_pages: int = 256

    @property
    def pages(self) -> int:
        return self.identical_pages + self.partial_pages + self.distinct_pages

    def check(self) -> FillParams:
        for name, v in zip(("vm_id", "seed", "identical_pages", "partial_pages",
                            "distinct_pages", "timed_pages"), astuple(self), strict=True):  # fmt: skip
            if not isinstance(v, int) or not 0 <= v < 1 << 64:
                raise ConfigError(f"ksm-fill: {name} must be an unsigned 64-bit integer")
        if self.timed_pages > min(self.identical_pages, self.distinct_pages):
            raise ConfigError("ksm-fill: timed_pages must not exceed identical or distinct pages")
        return self

    def pack(self) -> bytes:
        return _LAYOUT.pack(MAGIC, *astuple(self))


def image_path():
    from ..sdk.examples import find_example

    example = find_example("ksm-fill")
    assert example is not None
    return example.build()


def fill_area(image) -> int:
    """Guest-physical address of the first filled page: the image's end, page-aligned (the
    guest computes the same from __kvmpy_image_end; SDK images are linked at their physical
    addresses)."""
    end = (image.symbols or {}).get("__kvmpy_image_end")
    if end is None:
        raise BadImage("the image is not the ksm-fill example (no __kvmpy_image_end)")
    return (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def set_params(machine, params: FillParams) -> None:
    image = machine.image
    if image is None or SYMBOL not in (image.symbols or {}):
        raise BadImage("the loaded image is not the ksm-fill example (no ksmfill_params)")
    machine.memory.write(image.symbols[SYMBOL], params.check().pack())


# --- the virtio-balloon example (guest/examples/virtio-balloon.c) ---------------------------------

BALLOON_SYMBOL = "balloon_params"
BALLOON_MAGIC = 0x316E6F6F6C6C6142  # "Balloon1"


@dataclass(frozen=True)
class BalloonParams:
    work_pages: int = 4096  # pages the guest uses, then frees
    report: int = 1  # report the freed pages (free page reporting)
    report_delay: int = 0  # TSC cycles between freeing and reporting
    hold: int = 1  # then serve the balloon forever
    ram_bytes: int = 0  # "total memory" in its statistics

    def pack(self) -> bytes:
        return struct.pack("<6Q", BALLOON_MAGIC, *astuple(self))


def balloon_image(dst, params: BalloonParams):
    """A copy of the virtio-balloon example with `params` built in."""
    from ..loader import patch_symbol
    from ..sdk.examples import find_example

    example = find_example("virtio-balloon")
    assert example is not None
    return patch_symbol(example.build(), dst, BALLOON_SYMBOL, params.pack())

"""The `hashchain` example guest (guest/examples/hashchain.c) and its parameters.

Tests and `kvmpy bench persist` use it: it computes a long deterministic sequence over a few
MiB of memory, keeps an accumulator in an SSE register and prints a checkpoint line per step,
so any state a snapshot or a migration lost would change its output. Its parameters live in
the guest's `hashchain_params` structure, which the VMM overwrites before the guest starts
(`set_params`), or which is patched into a copy of the ELF file (`write_image`) for a guest run
by another process.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..errors import BadImage

SYMBOL = "hashchain_params"
MAGIC = 0x3176434843485348
#: `ticks` value for a tick loop that never ends.
FOREVER = (1 << 64) - 1
_LAYOUT = struct.Struct("<8Q")


@dataclass(frozen=True)
class HashchainParams:
    work_bytes: int = 4 << 20  # memory the chain walks (touched first)
    lines: int = 400  # checkpoint lines
    rounds_per_line: int = 100_000  # chain steps per line
    memsum_every: int = 25  # a sum over all the memory every this many lines
    dirty_pages: int = 0  # after the lines: pages written per tick (0: idle)
    tick_cycles: int = 1_000_000  # TSC cycles per tick
    ticks: int = 0  # ticks before exiting (0: no tick loop, FOREVER: endless)

    def pack(self) -> bytes:
        return _LAYOUT.pack(MAGIC, *astuple(self))


def image_path() -> Path:
    """The built example (cached by the SDK)."""
    from ..sdk.examples import find_example

    example = find_example("hashchain")
    assert example is not None
    return example.build()


def set_params(machine, params: HashchainParams) -> None:
    """Overwrite the parameters of a loaded hashchain image before it runs."""
    image = machine.image
    if image is None or SYMBOL not in image.symbols:
        raise BadImage("the loaded image is not the hashchain example (no hashchain_params)")
    machine.memory.write(image.symbols[SYMBOL], params.pack())


def write_image(dst: str | Path, params: HashchainParams, src: Path | None = None) -> Path:
    """A copy of the hashchain ELF with `params` as its built-in parameters."""
    src = src or image_path()
    data = bytearray(src.read_bytes())
    with open(src, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name(SYMBOL) if symtab else None
        if not syms:
            raise BadImage(f"{src} has no {SYMBOL} symbol")
        addr = syms[0]["st_value"]
        for seg in elf.iter_segments():
            if (
                seg["p_type"] == "PT_LOAD"
                and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]
            ):
                offset = seg["p_offset"] + addr - seg["p_vaddr"]
                break
        else:
            raise BadImage(f"{SYMBOL} in {src} has no file bytes")
    data[offset : offset + _LAYOUT.size] = params.pack()
    dst = Path(dst)
    dst.write_bytes(data)
    return dst

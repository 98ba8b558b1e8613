"""Disassembly of guest instructions for stop reports (capstone)."""

from __future__ import annotations

import functools

import capstone


@functools.cache
def _engine(bits: int) -> capstone.Cs:
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def disassemble_one(code: bytes, address: int, bits: int) -> tuple[str, int] | None:
    """The first instruction in `code` as text ('out dx, eax') and its length, or None."""
    for insn in _engine(bits).disasm(code, address, 1):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        return text, insn.size
    return None

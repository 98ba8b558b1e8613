"""The debug console at port 0xE9 (QEMU/Bochs convention): every byte written is output."""

from __future__ import annotations

from . import Device, Output

PORT = 0xE9


class DebugConsole(Device):
    name = "debugcon"

    def __init__(self) -> None:
        self.bytes_written = 0

    def read(self, offset: int, size: int) -> bytes:
        # Bochs returns the port number so a guest can detect the console.
        return bytes([PORT]) * size

    def write(self, offset: int, data: bytes) -> Output:
        # A 16/32-bit `out` to the port writes its low byte, as on QEMU's isa-debugcon.
        out = bytes(data[:1])
        self.bytes_written += 1
        return Output(out)

    def write_string(self, offset: int, size: int, data: memoryview) -> Output:
        out = bytes(data[::size])
        self.bytes_written += len(out)
        return Output(out)

    def state(self) -> dict:
        return {"bytes_written": self.bytes_written}

    def restore_state(self, state: dict) -> None:
        self.bytes_written = int(state.get("bytes_written", 0))

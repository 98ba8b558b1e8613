"""The API's one error type: a message for `fault_message` and an HTTP status (400 unless
said otherwise, as Firecracker answers bad input)."""

from __future__ import annotations

from ..errors import KvmpyError


class ApiError(KvmpyError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = 1000) -> str:
    """`fault_message` is one line: whatever a lower layer said, folded and bounded."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The libunicorn functions the backend's hot paths call, without ctypes argument types.

The Python binding declares `argtypes` for every function, and ctypes' conversion of each
argument through them costs more than the call itself: ~2.6 µs per `uc_reg_read_batch` against
~1.0 µs without them (measured here, loaded host). Callers pass ready ctypes objects (a
`c_void_p` engine handle, arrays, `byref`s, `c_uint64`s), which ctypes hands over as they are.
"""

from __future__ import annotations

import ctypes as C

from unicorn.unicorn_py3.unicorn import uclib

_lib = C.CDLL(uclib._name)


def _fn(name: str):
    f = getattr(_lib, name)
    f.restype = C.c_int
    return f


reg_read = _fn("uc_reg_read")
reg_read_batch = _fn("uc_reg_read_batch")
reg_write = _fn("uc_reg_write")
emu_start = _fn("uc_emu_start")
emu_stop = _fn("uc_emu_stop")
query = _fn("uc_query")
context_save = _fn("uc_context_save")
context_restore = _fn("uc_context_restore")


def handle(uc) -> C.c_void_p:
    """The engine handle of a binding `Uc`, as these functions take it."""
    return C.c_void_p(uc._uch.value)

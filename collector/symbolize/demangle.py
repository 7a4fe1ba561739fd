"""C++ symbol names, demangled with libstdc++'s own __cxa_demangle (through
ctypes): the names a profile shows should be the ones in the source."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

_lib = None
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def _load():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
        try:
            lib = ctypes.CDLL(name)
            fn = lib.__cxa_demangle
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
            _lib = fn
        except (OSError, AttributeError):
            _lib = False
    return _lib


@functools.lru_cache(maxsize=65536)
def demangle(name: str) -> str:
    """The demangled form of an Itanium C++ ABI name (_Z...), else name."""
    if not name.startswith("_Z"):
        return name
    fn = _load()
    if not fn:
        return name
    status = ctypes.c_int(0)
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if not ptr or status.value != 0:
        return name
    try:
        return ctypes.string_at(ptr).decode(errors="replace")
    finally:
        _libc.free(ptr)


def available() -> Optional[bool]:
    return bool(_load())

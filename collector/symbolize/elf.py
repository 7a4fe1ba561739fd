"""The GNU build id of an ELF file, read from its PT_NOTE segments, and its
PT_LOAD segments."""
from __future__ import annotations

import struct
from typing import BinaryIO, Optional

PT_LOAD = 1
PT_NOTE = 4
NT_GNU_BUILD_ID = 3


def build_id(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return build_id_of(f)
    except OSError:
        return None


def build_id_of(f: BinaryIO) -> Optional[str]:
    """The build id of the ELF image in a seekable binary file object (a
    file, or io.BytesIO of an image read from memory such as the vdso)."""
    try:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF":
            return None
        is64, little = ident[4] == 2, ident[5] == 1
        end = "<" if little else ">"
        if is64:
            f.seek(0x20)
            phoff, = struct.unpack(end + "Q", f.read(8))
            f.seek(0x36)
            phentsize, phnum = struct.unpack(end + "HH", f.read(4))
        else:
            f.seek(0x1C)
            phoff, = struct.unpack(end + "I", f.read(4))
            f.seek(0x2A)
            phentsize, phnum = struct.unpack(end + "HH", f.read(4))
        for i in range(min(phnum, 256)):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            p_type, = struct.unpack(end + "I", ph[:4])
            if p_type != PT_NOTE:
                continue
            if is64:
                p_offset, _, _, p_filesz = struct.unpack(end + "QQQQ", ph[8:40])
            else:
                p_offset, _, _, p_filesz = struct.unpack(end + "IIII", ph[4:20])
            f.seek(p_offset)
            found = _scan_notes(f.read(min(p_filesz, 1 << 16)), end)
            if found:
                return found
    except (OSError, ValueError, struct.error):   # ValueError: BytesIO seek before 0
        return None
    return None


def _scan_notes(data: bytes, end: str) -> Optional[str]:
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack(end + "III", data[pos:pos + 12])
        pos += 12
        name = data[pos:pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if ntype == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU":
            return desc.hex()
    return None


def load_segments(path: str) -> list:
    """(file offset, file size, virtual address) of each PT_LOAD segment, to
    turn a file offset into the ELF virtual address symbols are given in."""
    out = []
    try:
        with open(path, "rb") as f:
            ident = f.read(16)
            if ident[:4] != b"\x7fELF":
                return out
            is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
            f.seek(0x20 if is64 else 0x1C)
            phoff, = struct.unpack(end + ("Q" if is64 else "I"), f.read(8 if is64 else 4))
            f.seek(0x36 if is64 else 0x2A)
            phentsize, phnum = struct.unpack(end + "HH", f.read(4))
            for i in range(min(phnum, 256)):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if struct.unpack(end + "I", ph[:4])[0] != PT_LOAD:
                    continue
                if is64:
                    p_offset, p_vaddr, _, p_filesz = struct.unpack(end + "QQQQ", ph[8:40])
                else:
                    p_offset, p_vaddr, _, p_filesz = struct.unpack(end + "IIII", ph[4:20])
                out.append((p_offset, p_filesz, p_vaddr))
    except (OSError, struct.error):
        return []
    return out

"""The on-disk form of one table, written by the build child and read by
the agent: a fixed header (magic, version, n_rows, length of a JSON block),
the JSON block (build id, stats, reason), then the packed rows. A file that
does not parse is a cache miss, never an error."""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

from .rows import ROW_SIZE, UnwindTable

MAGIC = b"OTBUNWND"
VERSION = 1                          # bump when a row can mean something else (rows.py, rules.py)
HEADER = struct.Struct("<8sIII")     # magic, version, n_rows, meta_len
MAX_META = 1 << 20


def dump(table: UnwindTable) -> bytes:
    meta = json.dumps({"build_id": table.build_id, "stats": table.stats, "reason": table.reason},
                      sort_keys=True).encode()
    return HEADER.pack(MAGIC, VERSION, table.n_rows, len(meta)) + meta + table.rows


def write(path: str, table: UnwindTable) -> None:
    """Atomically: readers see the old file, none, or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(dump(table))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parse(data: bytes) -> Optional[UnwindTable]:
    if len(data) < HEADER.size:
        return None
    magic, version, n_rows, meta_len = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or meta_len > MAX_META:
        return None
    rows = data[HEADER.size + meta_len:]
    if len(rows) != n_rows * ROW_SIZE:
        return None
    try:
        meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
        stats = {str(k): int(v) for k, v in meta["stats"].items()}
        build_id, reason = meta["build_id"], meta["reason"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(build_id, (str, type(None))) or not isinstance(reason, (str, type(None))):
        return None
    return UnwindTable(rows=rows, stats=stats, build_id=build_id, reason=reason)


def read(path: str) -> Optional[UnwindTable]:
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except OSError:
        return None

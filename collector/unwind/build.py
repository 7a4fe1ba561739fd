"""The build child: `python -m collector.unwind.build <elf path | --vdso> <out>`
builds one table and writes it to <out> (cachefile format). It runs apart
from the agent (builder.py starts it under a timeout and an address-space
limit) so pyelftools' time and memory never touch the collection path.
Exit status 0 whenever <out> was written, even for an empty table; 3 when
memory ran out, 4 when the file could not be read (nothing written: another
try may succeed)."""
from __future__ import annotations

import io
import os
import resource
import sys
import time

from ..symbolize.elf import build_id, build_id_of
from . import cachefile
from .table import OUT_OF_MEMORY, build_rows, transient
from .vdso import vdso_image

VDSO = "--vdso"
EXIT_NO_MEMORY, EXIT_CANNOT_READ = 3, 4


def _vm_peak_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def build(src: str):
    if src == VDSO:
        image = vdso_image()
        return build_rows(io.BytesIO(image), build_id_of(io.BytesIO(image)))
    return build_rows(src, build_id(src))


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m collector.unwind.build <elf path | --vdso> <out>", file=sys.stderr)
        return 2
    try:
        t0 = time.monotonic()
        table = build(args[0])
        if table.reason == OUT_OF_MEMORY:
            raise MemoryError
        if transient(table):
            print(table.reason, file=sys.stderr)
            return EXIT_CANNOT_READ
        table.stats["build_ms"] = int((time.monotonic() - t0) * 1000)
        table.stats["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        table.stats["vm_peak_kb"] = _vm_peak_kb()
        cachefile.write(args[1], table)
        return 0
    except MemoryError:
        # near the limit even reporting can fail again: leave at once, no finalizers
        os.write(2, b"MemoryError: the table did not fit under the address-space limit\n")
        os._exit(EXIT_NO_MEMORY)


if __name__ == "__main__":
    sys.exit(main())

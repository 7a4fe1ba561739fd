#!/usr/bin/env python3
"""Unpack the CPython interpreters other Debian releases ship, for the
Python-frame tests (tests/test_python_frames.py) to run beside Debian 12's
3.11: Debian 11's 3.9 and Debian 13's 3.13 (with that release's glibc, which
its interpreter needs; the tests start it through that glibc's loader).

    python3 tools/other_pythons.py        # -> build/pythons/3.9, build/pythons/3.13

Packages come from Debian's archive through tools/kernel_vm.py's private apt
configuration (its own sources list, state and cache), so the machine's apt
setup is untouched; nothing is installed, only unpacked (dpkg-deb -x)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_vm  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "build" / "pythons"
WANT = {
    "3.9": ("bullseye", ["python3.9-minimal", "libpython3.9-minimal", "libpython3.9-stdlib", "libffi7"]),
    "3.13": ("trixie", ["python3.13-minimal", "libpython3.13-minimal", "libpython3.13-stdlib", "libc6"]),
}


def main() -> int:
    todo = {v: w for v, w in WANT.items() if not (OUT / v / ".done").exists()}
    if not todo:
        return 0
    opts = kernel_vm._private_apt(kernel_vm.KERNEL_CACHE / "apt")
    for version, (suite, packages) in todo.items():
        dest = OUT / version
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", *opts, "download", *[f"{p}/{suite}" for p in packages]],
                           check=True, cwd=tmp, stdout=subprocess.DEVNULL)
            dest.mkdir(parents=True, exist_ok=True)
            for deb in sorted(Path(tmp).glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        (dest / ".done").touch()
        print(f"CPython {version} ({suite}) unpacked in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Boot Debian's LTS kernels under qemu with this machine's / as the guest's
read-only root, and run one command inside: the kernel matrix's engine.

    python3 tools/kernel_vm.py list
    python3 tools/kernel_vm.py run 6.1 -- /work/main/.venv/bin/otelbpf check

How a guest is made, and why:
- The kernel comes from Debian's own `linux-image-<abi>-amd64-unsigned`
  package of each suite (bullseye 5.10, bookworm 6.1, trixie 6.12), fetched
  with a private apt sources list, state and cache, so the machine's own apt
  setup is untouched. Which ABI is current is read from the suite's
  `linux-image-amd64` metapackage; the .deb is cached (KERNEL_CACHE) and the
  cache is used without asking the registry when it already has one.
- The initramfs holds busybox (static), the 9p/virtio modules of that kernel
  (with their dependencies, read with kmod's `modinfo`) and an /init that
  mounts the host's / over 9p read-only, puts tmpfs on /tmp and /run, mounts
  proc/sys/dev/bpffs/cgroup2/tracefs and chroots. So the guest runs the
  host's python, venv and BPF objects: nothing is copied.
- This checkout is shared again at its own path (a clone under /tmp would
  be hidden by the guest's tmpfs otherwise).
- A 9p share (read-write) is the exchange folder, seen as /tmp/vm in
  the guest: the host writes `cmd.sh` there; the guest writes `rc` and
  whatever the command leaves in it. The console is captured to `console.log`.
- Software emulation (TCG): KVM hangs here. Guests take ~5 s to boot and
  everything in them runs ~10-30x slower than on the host.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

CHECKOUT = Path(__file__).resolve().parent.parent
KERNEL_CACHE = Path(os.environ.get("OTELBPF_KERNEL_CACHE", "/var/cache/otelbpf-kernels"))
DEBIAN = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Kernel series -> the Debian suite whose point release provides it.
SUITES: Dict[str, str] = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}
# Modules the guest needs, by name; their dependencies are added. Built-in
# ones (6.12 has virtio_pci built in) are skipped.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "sch_ingress", "veth")
HOST_TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "modinfo", "xz", "dpkg-deb")


class VmError(RuntimeError):
    pass


@dataclass
class Kernel:
    series: str          # "6.1"
    release: str         # "6.1.0-50-amd64" (uname -r in the guest)
    vmlinuz: Path
    initramfs: Path


def missing_host_tools() -> List[str]:
    return [t for t in HOST_TOOLS if shutil.which(t) is None]


def _apt_options(state: Path) -> List[str]:
    return ["-o", f"Dir::Etc::sourcelist={state / 'sources.list'}", "-o", "Dir::Etc::sourceparts=/nonexistent",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-q"]


def _private_apt(state: Path) -> List[str]:
    """An apt configuration of our own that lists the three suites."""
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    lines = [f"deb [signed-by={KEYRING}] {DEBIAN} {suite} main" for suite in SUITES.values()]
    (state / "sources.list").write_text("\n".join(lines) + "\n")
    opts = _apt_options(state)
    subprocess.run(["apt-get", *opts, "update"], check=True, stdout=subprocess.DEVNULL)
    return opts


def _image_package(opts: List[str], suite: str) -> str:
    """linux-image-amd64/<suite> depends on linux-image-<abi>-amd64 (= ver)."""
    out = subprocess.run(["apt-cache", *opts, "show", f"linux-image-amd64/{suite}"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Depends:"):
            return line.split(":", 1)[1].split("(")[0].strip() + "-unsigned"
    raise VmError(f"no Depends in linux-image-amd64/{suite}")


def fetch_debs(series_list: List[str]) -> Dict[str, Path]:
    """The cached .deb of each series, downloading only what is missing."""
    debs_dir = KERNEL_CACHE / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    found: Dict[str, Path] = {}
    for series in series_list:
        have = sorted(debs_dir.glob(f"linux-image-{series}.*-amd64-unsigned_*.deb"))
        if have:
            found[series] = have[-1]
    todo = [s for s in series_list if s not in found]
    if todo:
        opts = _private_apt(KERNEL_CACHE / "apt")
        for series in todo:
            pkg = _image_package(opts, SUITES[series])
            subprocess.run(["apt-get", *opts, "download", pkg], check=True, cwd=debs_dir,
                           stdout=subprocess.DEVNULL)
            found[series] = sorted(debs_dir.glob(f"{pkg}_*.deb"))[-1]
    return found


def _module_files(root: Path) -> Dict[str, Path]:
    return {p.name.split(".ko")[0].replace("-", "_"): p for p in root.rglob("*.ko*")}


def _depends(path: Path) -> List[str]:
    out = subprocess.run(["modinfo", "-F", "depends", str(path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    return [d.replace("-", "_") for d in out.split(",") if d]


def _module_load_order(modules_root: Path, builtin: set) -> List[Path]:
    files = _module_files(modules_root)
    order: List[Path] = []
    seen: set = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            if name in builtin:
                return
            raise VmError(f"module {name} is neither a file nor built into the kernel")
        for dep in _depends(files[name]):
            visit(dep)
        order.append(files[name])

    for name in GUEST_MODULES:
        visit(name)
    return order


INIT = r"""#!/bin/busybox sh
# The guest's /init: modules, the host's / over 9p, then the command.
export PATH=/bin
busybox mkdir -p /proc /sys /dev /mnt /tmp
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
for m in $(busybox cat /modules.list); do busybox insmod /lib/mod/$m || echo "insmod $m failed"; done
busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt || busybox poweroff -f
busybox mount -t tmpfs -o mode=1777 tmpfs /mnt/tmp
busybox mount -t tmpfs tmpfs /mnt/run
busybox mkdir -p /mnt/tmp/vm
busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmwork /mnt/tmp/vm
# the checkout, at its own path: under /tmp (a CI clone) the tmpfs hides it
for arg in $(busybox cat /proc/cmdline); do
  case "$arg" in otelbpf.checkout=*) checkout="${arg#otelbpf.checkout=}";; esac
done
if [ -n "$checkout" ]; then
  busybox mkdir -p "/mnt$checkout"
  busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose checkout "/mnt$checkout"
fi
busybox mount -t proc proc /mnt/proc
busybox mount -t sysfs sys /mnt/sys
busybox mount -t devtmpfs dev /mnt/dev
busybox mkdir -p /mnt/dev/shm /mnt/dev/pts
busybox mount -t tmpfs tmpfs /mnt/dev/shm
busybox mount -t devpts devpts /mnt/dev/pts
busybox mount -t cgroup2 cgroup2 /mnt/sys/fs/cgroup
busybox mount -t bpf bpf /mnt/sys/fs/bpf
busybox mount -t tracefs tracefs /mnt/sys/kernel/tracing
busybox mount -t debugfs debugfs /mnt/sys/kernel/debug
busybox ip link set lo up
busybox chroot /mnt /bin/sh /tmp/vm/cmd.sh > /dev/console 2>&1
echo $? > /mnt/tmp/vm/rc
busybox sync
busybox poweroff -f
"""


def _build_initramfs(extracted: Path, out: Path) -> str:
    """Write out the initramfs for one extracted kernel package; return its release."""
    modules_base = next(p for p in (extracted / "lib" / "modules", extracted / "usr" / "lib" / "modules")
                        if p.is_dir())
    release_dir = next(modules_base.iterdir())
    builtin = {Path(line.strip()).name.split(".ko")[0].replace("-", "_")
               for line in (release_dir / "modules.builtin").read_text().splitlines() if line.strip()}
    order = _module_load_order(release_dir, builtin)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(shutil.which("busybox"), root / "bin" / "busybox")
        os.symlink("busybox", root / "bin" / "sh")
        (root / "lib" / "mod").mkdir(parents=True)
        names = []
        for path in order:
            name = path.name.split(".ko")[0] + ".ko"
            data = path.read_bytes()
            if path.name.endswith(".xz"):   # busybox's insmod takes plain .ko only
                data = subprocess.run(["xz", "-dc"], input=data, capture_output=True, check=True).stdout
            (root / "lib" / "mod" / name).write_bytes(data)
            names.append(name)
        (root / "modules.list").write_text("\n".join(names) + "\n")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        out.write_bytes(subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout)
    return release_dir.name


def prepare(series: str) -> Kernel:
    """Kernel image and initramfs for one series, built once and cached."""
    if series not in SUITES:
        raise VmError(f"unknown kernel series {series!r}; known: {', '.join(SUITES)}")
    missing = missing_host_tools()
    if missing:
        raise VmError(f"missing host tools: {', '.join(missing)} (make setup installs them)")
    deb = fetch_debs([series])[series]
    # a changed /init or module list makes a new initramfs
    recipe = hashlib.sha256((INIT + " ".join(GUEST_MODULES)).encode()).hexdigest()[:12]
    built = KERNEL_CACHE / "built" / f"{deb.stem}-{recipe}"
    marker = built / "release"
    if not marker.exists():
        if built.exists():
            shutil.rmtree(built)
        built.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            vmlinuz = next((Path(tmp) / "boot").glob("vmlinuz-*"))
            shutil.copy2(vmlinuz, built / "vmlinuz")
            release = _build_initramfs(Path(tmp), built / "initramfs.gz")
        marker.write_text(release)
    return Kernel(series, marker.read_text().strip(), built / "vmlinuz", built / "initramfs.gz")


@dataclass
class VmResult:
    rc: Optional[int]        # the command's exit status; None: the guest never got to write it
    console: str
    workdir: Path
    seconds: float


def run(kernel: Kernel, script: str, workdir: Path, timeout: float = 600.0, memory_mb: int = 3072,
        cpus: int = 2) -> VmResult:
    """Boot `kernel`, run `script` (sh) as root in the chroot, power off.
    `workdir` is /tmp/vm in the guest (read-write)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rc").unlink(missing_ok=True)
    (workdir / "cmd.sh").write_text("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                                    "export HOME=/tmp TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1\n" + script)
    console = workdir / "console.log"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
           "-nographic", "-no-reboot", "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initramfs),
           "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 otelbpf.checkout={CHECKOUT}",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={workdir},mount_tag=vmwork,security_model=none,multidevs=remap",
           "-virtfs", f"local,path={CHECKOUT},mount_tag=checkout,security_model=none,readonly=on,multidevs=remap",
           "-nic", "none"]   # loopback is the only network a guest needs
    started = time.monotonic()
    with open(console, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rc_file = workdir / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.exists() and rc_file.read_text().strip() else None
    return VmResult(rc, console.read_text(errors="replace"), workdir, time.monotonic() - started)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="kernel series known, and which are cached")
    r = sub.add_parser("run", help="boot a kernel and run a command in it")
    r.add_argument("series", choices=sorted(SUITES))
    r.add_argument("--workdir", type=Path, default=None)
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for series, suite in SUITES.items():
            have = sorted((KERNEL_CACHE / "debs").glob(f"linux-image-{series}.*-amd64-unsigned_*.deb"))
            print(f"{series:5} {suite:9} {have[-1].name if have else '(not cached)'}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    kernel = prepare(args.series)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"vm-{args.series}-"))
    res = run(kernel, shlex.join(command) + "\n", workdir, timeout=args.timeout)
    sys.stdout.write(res.console)
    print(f"[{kernel.release}: exit {res.rc} in {res.seconds:.0f}s; workdir {workdir}]", file=sys.stderr)
    return res.rc if res.rc is not None else 124


if __name__ == "__main__":
    sys.exit(main())

"""Guest provisioning: a Debian cloud kernel and a generated initramfs, cached and rebuilt on change.

The kernel comes from `apt-get download linux-image-6.1.0-N-cloud-amd64` (newest N the host's apt
lists know), unpacked with `dpkg-deb -x` and indexed with `depmod -b`; nothing is installed into the
host's /boot. The initramfs holds busybox-static, the modules the guest needs in `modules.dep` order,
host dmsetup/e2fsprogs (and xfsprogs/btrfs-progs when present) with their `ldd` libraries, and the
`/init` of `crashlab.guest.inguest.init`. Everything lives under `$CRASHLAB_CACHE`, else
`$XDG_CACHE_HOME/crashlab`, else `~/.cache/crashlab`, in a directory named by a hash of every input,
so a changed input (kernel, host binary, init script, module list) builds a new guest.
See DESIGN.md, "Guests on these machines".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from crashlab import proc
from crashlab.diskmodels import DISK_MODELS, kernel_option
from crashlab.filesystems import FILESYSTEMS
from crashlab.guest.inguest import init as guest_init

TOOL_TIMEOUT_S = 600.0  # apt-get download of a kernel on a slow mirror; everything else is quicker
FORMAT = 1  # bump when the initramfs layout changes in a way the inputs below do not capture
SERIES = "6.1"
FLAVOUR = "cloud-amd64"

# What /init loads, by module name; dependencies come from modules.dep.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "dm_mod", "dm_log_writes", "dm_flakey", "fuse", "virtiofs",
    "loop",  # the long-lived checker guest attaches each crash image from its share
)
# Loaded by the guest only for that filesystem (crashlab.filesystems): under TCG xfs and btrfs (with
# raid6's boot-time benchmark) cost 2 s of every boot otherwise. Built-in filesystems have no entry.
FS_MODULES: dict[str, tuple[str, ...]] = {fs.name: fs.modules for fs in FILESYSTEMS.values() if fs.modules}
OPTIONAL_MODULES = ("crc32c_intel", "blake2b_generic", "xxhash_generic")  # others do the job if absent
# Loaded by the guest only for that disk model (crashlab.diskmodels): SCSI and ATA probing costs
# boot time under TCG, and virtio-blk is loaded anyway.
DISK_MODULES: dict[str, tuple[str, ...]] = {
    d.name: tuple(m for m in d.guest_modules if m not in GUEST_MODULES) for d in DISK_MODELS.values()}
# What every guest needs (the virtiofs share, the checker's and the log's virtio disks); a kernel
# without one of these cannot run crashlab at all. Any other absent driver only rules out the
# configurations that need it (Guest.lacking).
BASE_MODULES = ("virtio_pci", "virtio_blk", "fuse", "virtiofs")
BUILTIN_DRIVERS = ("ext4",)  # not loaded (the Debian kernel builds them in), but checked for

# Host binaries for the initramfs (the busybox-shell path); the virtiofs path uses the host's.
REQUIRED_BINARIES = tuple(dict.fromkeys(
    ("dmsetup", *(b for fs in FILESYSTEMS.values() if fs.required for b in fs.binaries))))
OPTIONAL_BINARIES = tuple(dict.fromkeys(
    b for fs in FILESYSTEMS.values() if not fs.required for b in fs.binaries if b not in REQUIRED_BINARIES))
# Not fio (crashlab.cost): only the shell transport runs the initramfs's binaries, and it runs no cost
# job; Debian's fio links 64 libraries (librados, librbd, glusterfs: 80 MiB, measured), which would
# make every guest's 23 MiB initramfs four times larger and every TCG boot slower. A cost guest
# runs the host's fio over virtiofs, as it runs the host's mkfs.

# Which Debian package provides a missing piece, for the one-line error.
PROVIDER = {
    "busybox": "busybox-static", "dmsetup": "dmsetup", "mke2fs": "e2fsprogs", "e2fsck": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_repair": "xfsprogs", "mkfs.btrfs": "btrfs-progs",
    "btrfs": "btrfs-progs", "cpio": "cpio", "depmod": "kmod", "dpkg-deb": "dpkg", "apt-get": "apt",
    "apt-cache": "apt", "ldd": "libc-bin", "qemu-system-x86_64": "qemu-system-x86",
    "virtiofsd": "qemu-system-common", "qemu-img": "qemu-utils", "fio": "fio",
}


class ProvisionError(RuntimeError):
    """A guest cannot be built; the message is one line and names what provides the missing piece."""


def missing(tool: str, what: str = "") -> ProvisionError:
    pkg = PROVIDER.get(tool)
    hint = f" (apt-get install {pkg})" if pkg else ""
    return ProvisionError(f"{what or tool} not found{hint}")


def which(tool: str, extra_dirs: Iterable[str] = ("/usr/sbin", "/sbin")) -> str:
    """`tool` on PATH or in the sbin directories a non-root PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    found = shutil.which(tool, path=path)
    if not found:
        raise missing(tool)
    return found


def cache_root() -> Path:
    if os.environ.get("CRASHLAB_CACHE"):
        return Path(os.environ["CRASHLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crashlab"


# --- pure helpers -------------------------------------------------------------------------------

_PKG = re.compile(r"^linux-image-(\d+\.\d+)\.(\d+)-(\d+)-([a-z0-9-]+?)(-unsigned)?$")


def newest_kernel_package(names: Iterable[str], series: str = SERIES, flavour: str = FLAVOUR) -> str | None:
    """The newest `linux-image-<series>.0-N-<flavour>` among package names (signed preferred)."""
    best: tuple[int, int, int] | None = None
    best_name = None
    for name in names:
        m = _PKG.match(name.strip())
        if not m or m.group(1) != series or m.group(4) != flavour:
            continue
        rank = (int(m.group(2)), int(m.group(3)), 0 if m.group(5) else 1)
        if best is None or rank > best:
            best, best_name = rank, name.strip()
    return best_name


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as {module name: (path, [dependency paths])}; names use `_` for `-`."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[module_name(path)] = (path.strip(), rest.split())
    return deps


def module_name(path: str) -> str:
    base = os.path.basename(path.strip())
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def load_order(deps: dict[str, tuple[str, list[str]]], wanted: Sequence[str]) -> list[str]:
    """Module paths to insmod, every dependency before its users, each once.

    Raises KeyError naming a wanted module that the kernel does not ship as a module (it may be
    built in: callers drop those with `builtin`).
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ValueError(f"dependency cycle: {' -> '.join((*chain, name))}")
        path, dep_paths = deps[name]
        for dep in dep_paths:
            visit(module_name(dep), (*chain, name))
        seen.add(name)
        order.append(path)

    for want in wanted:
        visit(want.replace("-", "_"), ())
    return order


def inputs_key(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> dict[str, object]:
    """What identifies a host file cheaply: path, size and mtime (a package upgrade changes them)."""
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def parse_ldd(text: str) -> list[str]:
    """Library paths from `ldd` output (the dynamic loader included)."""
    libs = []
    for line in text.splitlines():
        line = line.strip()
        target = (line.split("=>", 1)[1] if "=>" in line else line).split("(")[0].strip()
        if target.startswith("/"):
            libs.append(target)
    return libs


# --- the guest ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Guest:
    """A bootable guest: kernel, initramfs and what they were built from."""

    kernel: Path
    initrd: Path
    kernel_version: str  # uname -r of the guest
    kernel_package: str | None  # Debian package and version, None for a user's own kernel
    package_version: str | None
    modules: tuple[str, ...]  # insmod order, paths relative to lib/modules/VERSION
    key: str
    directory: Path
    absent: tuple[str, ...] = ()  # drivers this kernel has neither as a module nor built in

    def lacking(self, needed: Iterable[str]) -> str | None:
        """The one-line refusal for a configuration needing a driver this kernel lacks, or None."""
        gone = [m for m in dict.fromkeys(needed) if m in self.absent and m not in OPTIONAL_MODULES]
        if not gone:
            return None
        return (f"guest kernel {self.kernel_version} lacks "
                + ", ".join(f"{m} ({kernel_option(m)})" for m in gone)
                + ": build it with that option, or use another --kernel")

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _run(*argv: str, cwd: str | Path | None = None, timeout: float = TOOL_TIMEOUT_S) -> str:
    """A host command under a deadline; its stderr's last line becomes the error."""
    try:
        return proc.check(argv, timeout, cwd=cwd)
    except proc.ToolError as e:
        raise ProvisionError(str(e)) from None


APT_LISTS = Path("/var/lib/apt/lists")


def newest_listed_kernel(cache: Path, lists: Path = APT_LISTS) -> str:
    """The newest kernel package the apt lists know. `apt-cache pkgnames` takes seconds, and every
    checker unit provisions: the answer is kept on disk, keyed by the lists' identity (an `apt-get
    update` changes it)."""
    try:
        key = json.dumps(file_identity(lists), sort_keys=True)
    except OSError:
        key = ""
    memo = cache / "kernel-package.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(memo.read_text())
        if key and known["lists"] == key:
            return str(known["package"])
    out = _run(which("apt-cache"), "pkgnames", f"linux-image-{SERIES}.0-")
    package = newest_kernel_package(out.split())
    if package is None:
        raise ProvisionError(
            f"no linux-image-{SERIES}.0-N-{FLAVOUR} package in the apt lists (run apt-get update)")
    with contextlib.suppress(OSError):
        _mkdirs(cache)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"lists": key, "package": package}))
        os.replace(tmp, memo)
    return package


def fetch_kernel(package: str | None = None, cache: Path | None = None) -> tuple[Path, str, str, str]:
    """Download and unpack a Debian kernel package into the cache.

    Returns (unpacked root, kernel version, package, package version). An unpacked kernel is
    reused without asking apt again when the package is named and already there.
    """
    cache = cache or cache_root()
    if package is None:
        package = newest_listed_kernel(cache)
    root = cache / "kernels" / package
    meta = root / "crashlab-kernel.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return root, m["kernel_version"], package, m["package_version"]
    with tempfile.TemporaryDirectory(dir=_mkdirs(cache / "kernels"), prefix=".fetch-") as tmp:
        _run(which("apt-get"), "download", package, cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise ProvisionError(f"apt-get download {package} produced no .deb")
        pkg_version = debs[0].name.split("_")[1]
        unpack = Path(tmp) / "root"
        _run(which("dpkg-deb"), "-x", str(debs[0]), str(unpack))
        versions = [p.name for p in (unpack / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise ProvisionError(f"{package}: expected one lib/modules/VERSION, found {versions}")
        version = versions[0]
        _run(which("depmod"), "-b", str(unpack), version)
        (unpack / "crashlab-kernel.json").write_text(json.dumps(
            {"package": package, "package_version": pkg_version, "kernel_version": version}))
        try:
            os.rename(unpack, root)
        except OSError:
            if not meta.exists():  # another process won the race only if it finished
                raise
    return root, version, package, pkg_version


def _mkdirs(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _libraries(binaries: Iterable[str]) -> list[str]:
    ldd = which("ldd")
    libs: list[str] = []
    for b in binaries:
        r = proc.run([ldd, b], TOOL_TIMEOUT_S)
        if r.returncode == 0:  # non-zero: a static binary
            libs += [lib for lib in parse_ldd(r.stdout.decode(errors="replace")) if lib not in libs]
    return libs


def provision(kernel: str | Path | None = None, modules: str | Path | None = None,
              package: str | None = None, cache: Path | None = None, rebuild: bool = False) -> Guest:
    """A guest kernel and initramfs, built once per set of inputs and then taken from the cache.

    `kernel`/`modules`: a user's own bzImage and the `lib/modules/VERSION` directory built for it
    (with modules.dep). Otherwise `package` (default: the newest Debian 6.1 cloud kernel) is fetched.
    """
    cache = cache or cache_root()
    busybox = which("busybox")
    if _libraries([busybox]):
        raise ProvisionError(f"{busybox} is not static (apt-get install busybox-static)")
    cpio = which("cpio")
    binaries = [which(b) for b in REQUIRED_BINARIES]
    for b in OPTIONAL_BINARIES:
        # Absent: that filesystem has no busybox-shell path; the virtiofs path uses the host's.
        with contextlib.suppress(ProvisionError):
            binaries.append(which(b))

    if (kernel is None) != (modules is None):
        raise ProvisionError("--kernel and --modules go together (the modules must match the kernel)")
    if kernel is not None and modules is not None:
        kernel_path, moddir = Path(kernel).resolve(), Path(modules).resolve()
        if not kernel_path.is_file():
            raise ProvisionError(f"{kernel_path}: no such kernel image")
        if not (moddir / "modules.dep").is_file():
            raise ProvisionError(f"{moddir}: no modules.dep (run depmod, or point at lib/modules/VERSION)")
        version, pkg, pkg_version = moddir.name, None, None
    else:
        root, version, pkg, pkg_version = fetch_kernel(package, cache)
        kernel_path = root / "boot" / f"vmlinuz-{version}"
        moddir = root / "lib" / "modules" / version

    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    builtin_names = {module_name(p) for p in builtin.split()}
    every = (*GUEST_MODULES, *BUILTIN_DRIVERS,
             *(m for mods in (*FS_MODULES.values(), *DISK_MODULES.values()) for m in mods))
    absent = sorted({m for m in every if m not in deps and m not in builtin_names})
    fatal = [m for m in BASE_MODULES if m in absent]
    if fatal:
        named = ", ".join(f"{m} ({kernel_option(m)})" for m in fatal)
        raise ProvisionError(f"kernel {version} lacks {named}, which every crashlab guest needs")
    order = load_order(deps, [m for m in GUEST_MODULES if m in deps])
    fs_order = {fs: [p for p in load_order(deps, [m for m in mods if m in deps]) if p not in order]
                for fs, mods in FS_MODULES.items()}
    disk_order = {d: [p for p in load_order(deps, [m for m in mods if m in deps]) if p not in order]
                  for d, mods in DISK_MODULES.items()}
    init_text = guest_init.init_script()
    libs = _libraries(binaries)
    inputs = {
        "format": FORMAT, "kernel": file_identity(kernel_path), "modules": order,
        "moddir": str(moddir), "fs_modules": fs_order, "init": init_text,
        **({"disk_modules": disk_order} if any(disk_order.values()) else {}),
        "files": [file_identity(p) for p in (busybox, *binaries, *libs)],
    }
    key = inputs_key(inputs)
    guest_dir = cache / "guests" / key
    meta = guest_dir / "guest.json"
    if meta.exists() and not rebuild:
        return _guest_from(json.loads(meta.read_text()), guest_dir)

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=_mkdirs(cache / "guests")))
    try:
        stage = tmp / "initramfs"
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "host", "out", "lib/modules"):
            (stage / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, stage / "bin" / "busybox")
        for p in (*binaries, *libs):
            dest = stage / p.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(p), dest)
        for b in binaries:  # reachable from busybox's PATH however the host lays out /usr
            link = stage / "sbin" / os.path.basename(b)
            if not link.exists():
                link.symlink_to(b)
        if os.path.exists("/etc/mke2fs.conf"):
            shutil.copy2("/etc/mke2fs.conf", stage / "etc" / "mke2fs.conf")
        for rel in {*order, *(p for paths in (*fs_order.values(), *disk_order.values()) for p in paths)}:
            dest = stage / "lib" / "modules" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(moddir / rel, dest)
        (stage / "etc" / "crashlab-modules").write_text("".join(f"{m}\n" for m in order))
        for fs, paths in fs_order.items():
            (stage / "lib" / "modules" / f"crashlab-{fs}.list").write_text("".join(f"{m}\n" for m in paths))
        for d, paths in disk_order.items():
            listing = stage / "lib" / "modules" / f"crashlab-disk-{d}.list"
            listing.write_text("".join(f"{m}\n" for m in paths))
        (stage / "init").write_text(init_text)
        (stage / "init").chmod(0o755)
        # Uncompressed: under TCG the kernel unpacks a plain cpio faster than it inflates a gzip one.
        files = _run("find", ".", cwd=stage)
        archive = proc.run([cpio, "--quiet", "-o", "-H", "newc"], TOOL_TIMEOUT_S, cwd=stage,
                           input=files.encode())
        if archive.returncode != 0:
            raise ProvisionError(f"cpio: {archive.text.strip() or 'failed'}")
        (tmp / "initrd.img").write_bytes(archive.stdout)
        shutil.rmtree(stage)
        shutil.copy2(kernel_path, tmp / "vmlinuz")
        guest = Guest(kernel=guest_dir / "vmlinuz", initrd=guest_dir / "initrd.img",
                      kernel_version=version, kernel_package=pkg, package_version=pkg_version,
                      modules=tuple(order), key=key, directory=guest_dir,
                      absent=tuple(m for m in absent if m not in OPTIONAL_MODULES))
        (tmp / "guest.json").write_text(json.dumps({**guest.as_dict(), "inputs": inputs}, indent=1))
        if rebuild and guest_dir.exists():
            shutil.rmtree(guest_dir)
        try:
            os.rename(tmp, guest_dir)
        except OSError:
            if not meta.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _guest_from(json.loads(meta.read_text()), guest_dir)


def _guest_from(d: dict[str, object], guest_dir: Path) -> Guest:
    return Guest(kernel=guest_dir / "vmlinuz", initrd=guest_dir / "initrd.img",
                 kernel_version=str(d["kernel_version"]),
                 kernel_package=d["kernel_package"] if d["kernel_package"] else None,  # type: ignore[arg-type]
                 package_version=d["package_version"] if d["package_version"] else None,  # type: ignore[arg-type]
                 modules=tuple(d["modules"]), key=str(d["key"]), directory=guest_dir,  # type: ignore[arg-type]
                 absent=tuple(d.get("absent") or ()))  # type: ignore[arg-type]

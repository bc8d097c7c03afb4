"""Guest provisioning: package choice, module order, cache keys, error messages, and a real build."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from crashlab.guest import provision
from crashlab.guest.inguest import init as guestinit
from crashlab.guest.provision import (
    ProvisionError,
    load_order,
    module_name,
    newest_kernel_package,
    parse_ldd,
    parse_modules_dep,
)

pytest_plugins = ["conftest_guest"]


def test_newest_kernel_package_compares_numbers_not_strings() -> None:
    names = ["linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-56-cloud-amd64-unsigned",
             "linux-image-6.1.0-56-cloud-amd64", "linux-image-6.1.0-100-amd64",
             "linux-image-6.12.117+deb12-cloud-amd64", "linux-image-6.1.0-47-cloud-amd64-dbg"]
    assert newest_kernel_package(names) == "linux-image-6.1.0-56-cloud-amd64"
    assert newest_kernel_package(["linux-image-6.1.0-3-cloud-amd64-unsigned"]) == \
        "linux-image-6.1.0-3-cloud-amd64-unsigned"
    assert newest_kernel_package(["linux-image-6.1.0-100-amd64"]) is None


DEP = """\
kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/raid6/raid6_pq.ko kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/xor.ko:
kernel/lib/raid6/raid6_pq.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/md/dm-log-writes.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
"""


def test_load_order_puts_every_dependency_first_and_each_module_once() -> None:
    deps = parse_modules_dep(DEP)
    order = load_order(deps, ["virtio_pci", "dm-log-writes", "btrfs", "virtio"])
    assert len(order) == len(set(order)) == 10
    pos = {module_name(p): i for i, p in enumerate(order)}
    for name, (_, dep_paths) in deps.items():
        for d in dep_paths:
            assert pos[module_name(d)] < pos[name], (d, name)


@pytest.mark.guest
def test_load_order_on_the_real_kernel(guest: provision.Guest) -> None:
    moddir = Path(provision.cache_root(), "kernels", guest.kernel_package or "", "lib", "modules",
                  guest.kernel_version)
    if not moddir.exists():
        pytest.skip("a user-supplied kernel")
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    order = load_order(deps, ["btrfs", "xfs", "virtio_blk", "dm_flakey"])
    names = [module_name(p) for p in order]
    assert names.index("raid6_pq") < names.index("btrfs")
    assert names.index("libcrc32c") < names.index("xfs")
    assert names.index("virtio_ring") < names.index("virtio_blk")
    assert names.index("dm_mod") < names.index("dm_flakey")


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(KeyError):
        load_order(parse_modules_dep(DEP), ["nosuch"])


def test_parse_ldd() -> None:
    out = ("\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n")
    assert parse_ldd(out) == ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]


def test_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProvisionError, match=r"^busybox not found \(apt-get install busybox-static\)$"):
        provision.which("busybox", extra_dirs=())
    with pytest.raises(ProvisionError, match=r"apt-get install xfsprogs"):
        provision.which("mkfs.xfs", extra_dirs=())
    with pytest.raises(ProvisionError) as e:
        provision.provision(cache=tmp_path)
    assert "\n" not in str(e.value) and "apt-get install" in str(e.value)


def test_user_kernel_needs_modules_dep(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not really")
    with pytest.raises(ProvisionError, match="--kernel and --modules go together"):
        provision.provision(kernel=kernel, cache=tmp_path)
    (tmp_path / "6.9.0").mkdir()
    with pytest.raises(ProvisionError, match=r"no modules\.dep"):
        provision.provision(kernel=kernel, modules=tmp_path / "6.9.0", cache=tmp_path)


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CRASHLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert provision.cache_root() == tmp_path / "crashlab"
    monkeypatch.setenv("CRASHLAB_CACHE", str(tmp_path / "x"))
    assert provision.cache_root() == tmp_path / "x"


def test_inputs_key_changes_with_any_input() -> None:
    base = {"kernel": {"path": "/k", "size": 1, "mtime_ns": 2}, "init": "a", "modules": ["x"]}
    keys = {provision.inputs_key(base), provision.inputs_key({**base, "init": "b"}),
            provision.inputs_key({**base, "modules": ["x", "y"]}),
            provision.inputs_key({**base, "kernel": {"path": "/k", "size": 1, "mtime_ns": 3}})}
    assert len(keys) == 4


@pytest.mark.guest
def test_provisioned_guest_is_cached_and_complete(guest: provision.Guest) -> None:
    again = provision.provision()
    assert again.key == guest.key and again.initrd.stat().st_mtime == guest.initrd.stat().st_mtime
    assert guest.kernel_version.startswith("6.1.")
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=guest.initrd.open("rb"), capture_output=True,
                             text=True, check=True).stdout.split()
    for needed in ("init", "bin/busybox", "etc/crashlab-modules", "etc/mke2fs.conf",
                   "lib/modules/crashlab-xfs.list", "lib/modules/crashlab-btrfs.list"):
        assert needed in listing, needed
    assert any(p.endswith("/dmsetup") for p in listing) and any(p.endswith("/mke2fs") for p in listing)
    assert any("libc.so.6" in p for p in listing)
    names = [m.rsplit("/", 1)[-1] for m in guest.modules]
    assert names.index("virtiofs.ko") > names.index("fuse.ko")  # dependencies first
    assert "kernel/drivers/block/loop.ko" in guest.modules  # the checker guest's images
    assert "kernel/drivers/md/dm-log-writes.ko" in guest.modules
    assert guest.initrd.with_name("guest.json").exists()


def test_init_script_is_posix_shell() -> None:
    r = subprocess.run(["sh", "-n"], input=guestinit.init_script(), text=True, capture_output=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert guestinit.PROBE_OK in guestinit.init_script()


def test_the_kernel_package_is_looked_up_once_per_state_of_the_apt_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, lists, calls = tmp_path / "bin", tmp_path / "lists", tmp_path / "calls"
    bin_dir.mkdir()
    lists.mkdir()
    fake = bin_dir / "apt-cache"
    fake.write_text(f"#!/bin/sh\necho x >> {calls}\n"
                    "echo linux-image-6.1.0-56-cloud-amd64; echo linux-image-6.1.0-57-cloud-amd64\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert provision.newest_listed_kernel(tmp_path, lists) == "linux-image-6.1.0-57-cloud-amd64"
    assert provision.newest_listed_kernel(tmp_path, lists) == "linux-image-6.1.0-57-cloud-amd64"
    assert calls.read_text().count("x") == 1  # the second answer came from the cache
    os.utime(lists, ns=(1, 1))  # what an apt-get update does to the lists directory
    provision.newest_listed_kernel(tmp_path, lists)
    assert calls.read_text().count("x") == 2

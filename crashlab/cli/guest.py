"""`crashlab guest`: build and describe the disposable guest (kernel + initramfs)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from crashlab.cli import CrashlabError
from crashlab.guest.provision import ProvisionError, cache_root, provision


@click.group("guest")
def command() -> None:
    """The disposable guest: a Debian cloud kernel and a generated initramfs, cached."""


@command.command("provision")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your own kernel image (with --modules).")
@click.option("--modules", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Its lib/modules/VERSION directory (with modules.dep).")
@click.option("--package", default=None, help="Debian kernel package (default: newest 6.1 cloud-amd64).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if the cache has this guest.")
def provision_cmd(kernel: Path | None, modules: Path | None, package: str | None, rebuild: bool) -> None:
    """Fetch the kernel and build the initramfs (once per set of inputs)."""
    try:
        g = provision(kernel=kernel, modules=modules, package=package, rebuild=rebuild)
    except ProvisionError as e:
        raise CrashlabError(str(e)) from None
    click.echo(f"guest {g.key}: kernel {g.kernel_version} "
               f"({g.kernel_package or 'user-supplied'} {g.package_version or ''}), "
               f"initramfs {g.initrd.stat().st_size >> 10} KiB, {len(g.modules)} modules at boot")


@command.command("info")
@click.option("--json", "as_json", is_flag=True)
def info(as_json: bool) -> None:
    """List the guests in the cache."""
    guests = sorted((cache_root() / "guests").glob("*/guest.json"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(p.read_text()) for p in guests]
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "inputs"} for r in rows], indent=1))
        return
    if not rows:
        click.echo(f"no guests in {cache_root()}; run: crashlab guest provision")
    for r in rows:
        pkg = r['kernel_package'] or 'user-supplied'
        click.echo(f"{r['key']}  {r['kernel_version']}  {pkg}  {r['directory']}")

"""Options for what the user ships, shared by every command that boots a guest: the data disk
(model, AIO engine, discard, detect-zeroes, or all of them from a libvirt domain), their kernel and
their QEMU. Turned into cell fields here, once; a libvirt XML and an explicit option that both set
the same thing are refused rather than one silently winning."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from crashlab import libvirt
from crashlab.cli import CrashlabError
from crashlab.diskmodels import AIO_MODES, DETECT_ZEROES, DISCARD, DISK_MODELS

DISK_KEYS = ("disk", "aio", "discard", "detect_zeroes")
BUILD_KEYS = ("kernel", "modules", "qemu")
XML_KEYS = ("domain_xml", "disk_xml")
# What an XML sets besides the disk keys: a command's --cache.
XML_ALSO_SETS = ("cache",)

_File = click.Path(exists=True, dir_okay=False, path_type=Path)


def options(*, lists: bool = False, build: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The shared options; `lists`: --disk and --aio take comma-separated lists (matrix axes)."""
    several = ", comma-separated" if lists else ""
    opts = [
        click.option("--disk", default=None,
                     help=f"Data disk model{several}: {', '.join(DISK_MODELS)} [default: virtio-blk]."),
        click.option("--aio", default=None,
                     help=f"Host AIO engine{several}: {', '.join(AIO_MODES)} [default: threads; native "
                          "needs cache=none or directsync]."),
        click.option("--discard", type=click.Choice(DISCARD), default=None,
                     help="-blockdev discard= [default: ignore: guest discards stop at QEMU]."),
        click.option("--detect-zeroes", type=click.Choice(DETECT_ZEROES), default=None,
                     help="-blockdev detect-zeroes= [default: off]."),
        click.option("--domain-xml", type=_File, default=None,
                     help="A libvirt domain: its disk's cache, io, discard, detect_zeroes and bus."),
        click.option("--disk-xml", type=_File, default=None,
                     help="A libvirt <disk> element, as --domain-xml."),
    ]
    if build:
        opts += [
            click.option("--kernel", type=_File, default=None,
                         help="Your kernel image to boot the recording guest (with --modules)."),
            click.option("--modules", type=click.Path(exists=True, file_okay=False, path_type=Path),
                         default=None, help="Its lib/modules/VERSION directory (with modules.dep)."),
            click.option("--qemu", default=None, help="qemu-system-x86_64 binary [default: from PATH]."),
        ]

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return wrap


def xml_spec(domain_xml: Path | None, disk_xml: Path | None) -> libvirt.DiskSpec | None:
    if domain_xml and disk_xml:
        raise CrashlabError("--domain-xml and --disk-xml both name the disk: give one")
    path = domain_xml or disk_xml
    if path is None:
        return None
    try:
        return libvirt.read(path)
    except libvirt.LibvirtError as e:
        raise CrashlabError(str(e)) from None


def explicit(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is None or name not in ctx.params:
        return False
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


def take(options: dict[str, Any], *, lists: bool = False) -> dict[str, Any]:
    """Pop the shared options out of a command's `options` and return the cell fields they set
    (only those given: a field left out keeps its default); `cache` too when an XML sets it."""
    spec = xml_spec(options.pop("domain_xml", None), options.pop("disk_xml", None))
    given = {k: options.pop(k) for k in (*DISK_KEYS, *BUILD_KEYS) if k in options}
    fields: dict[str, Any] = {}
    if spec is not None:
        clash = [k for k in (*DISK_KEYS, *XML_ALSO_SETS) if given.get(k) is not None or explicit(k)]
        if clash:
            raise CrashlabError(f"--{clash[0].replace('_', '-')} and the libvirt XML both set it: give one")
        fields.update(spec.cell_fields())
    for k in DISK_KEYS:
        if given.get(k) is not None:
            fields[k] = given[k]
    for k in BUILD_KEYS:
        if given.get(k) is not None:
            # Absolute, not resolved: the path the user named is the one recorded (a link too).
            fields[k] = os.path.abspath(given[k]) if k != "qemu" or "/" in str(given[k]) else given[k]
    if lists:
        for k in ("disk", "aio", "cache"):
            if isinstance(fields.get(k), str):
                fields[k] = tuple(v.strip() for v in fields[k].split(",") if v.strip())
    return fields

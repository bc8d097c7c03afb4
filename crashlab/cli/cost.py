"""`crashlab cost`: fio in a guest per cache mode and barrier setting, figures into the store."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import click

from crashlab.cachemodes import UnknownCacheMode, cache_mode
from crashlab.cli import CrashlabError, shipped
from crashlab.filesystems import FILESYSTEMS
from crashlab.store import DEFAULT_PATH, Store, StoreError


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind: the Machine context manager stops QEMU


def _list(text: str, what: str) -> list[str]:
    values = list(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
    if not values:
        raise CrashlabError(f"--{what}: give at least one value")
    return values


def line(fields: dict[str, Any], figures: dict[str, Any], how: str) -> str:
    from crashlab.cost import accel_label

    return (f"{fields['fs']} cache={fields['cache']} barrier={fields['barrier']} disk={fields['disk']} "
            f"[{accel_label(fields['accel'])}]: seq write {figures['seq_mb_s']:.1f} MB/s, random write "
            f"{figures['rand_iops']:.0f} IOPS, fsync p50 {figures['fsync_p50_ms']:.2f} ms p99 "
            f"{figures['fsync_p99_ms']:.2f} ms ({how})")


@click.command("cost")
@click.option("--fs", type=click.Choice(list(FILESYSTEMS)), default="ext4", show_default=True)
@click.option("--cache", "caches", default="writeback,none,writethrough,directsync,unsafe", show_default=True,
              help="Cache modes, comma-separated.")
@click.option("--barrier", "barriers", default="on,off", show_default=True,
              help="on, off or both (XFS: on only).")
@click.option("--size", "size_mib", type=int, default=None, help="fio file size, MiB [default: 64].")
@click.option("--runtime", "runtime_s", type=float, default=None,
              help="Seconds per fio job, at most [default: 5].")
@click.option("--accel", type=click.Choice(["auto", "tcg", "kvm"]), default="auto", show_default=True,
              help="auto: KVM only if a short probe boot succeeds.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Hard limit for each guest, seconds.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=DEFAULT_PATH,
              show_default=True, help="SQLite results store.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Each guest's run.json, console and fio output [default: cost/ beside the store].")
@click.option("--again", is_flag=True, default=False, help="Measure even what the store already holds.")
@shipped.options(build=False)
def command(fs: str, caches: str, barriers: str, size_mib: int | None, runtime_s: float | None, accel: str,
            timeout_s: float, store_path: Path, out_dir: Path | None, again: bool,
            **drive_options: Any) -> None:
    """Measure the cost of safety: a guest per (cache mode, barrier) runs fio on its data disk,
    configured as a recording configures it but with no recorder in the path. Resumable: a stored
    figure is not measured again unless --again."""
    from crashlab import cost
    from crashlab.guest.machine import MachineError, choose_accel
    from crashlab.guest.provision import ProvisionError, provision, which
    from crashlab.record import ConfigError, RecordConfig, RecordError

    drive = shipped.take(drive_options)
    modes = [drive.pop("cache")] if "cache" in drive else _list(caches, "cache")
    bars = _list(barriers, "barrier")
    if bad := [b for b in bars if b not in ("on", "off")]:
        raise CrashlabError(f"--barrier {bad[0]!r}: on or off")
    size = cost.DEFAULT_SIZE_MIB if size_mib is None else size_mib
    runtime = cost.DEFAULT_RUNTIME_S if runtime_s is None else runtime_s
    try:
        configs = [cost.CostConfig(RecordConfig(fs=fs, cache=cache_mode(m), barrier=b == "on", accel=accel,
                                                timeout_s=timeout_s, **drive),
                                   size, runtime).validate()
                   for m in modes for b in bars]
        which("fio")
    except (UnknownCacheMode, ConfigError, cost.CostError, ProvisionError) as e:
        raise CrashlabError(str(e)) from None
    click.echo(f"cost of safety: {cost.NOTE}")
    work = out_dir or Path(store_path).parent / "cost"
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        with Store(store_path) as store:
            guest = provision()
            resolved = choose_accel(guest.kernel, guest.initrd, accel)
            for c in configs:
                fields = c.key_fields(resolved)
                key = cost.cost_key(fields)
                held = store.cost(key)
                if held is not None and not again:
                    click.echo(line(held.config, held.figures["figures"], "stored"))
                    continue
                c = replace(c, record=replace(c.record, accel=resolved))  # probed once, not per guest
                m = cost.measure(c, work / cost.slug(fields), guest=guest)
                # No runs row: a run's versions are the matrix's host tools, which the report lists.
                store.put_cost(m.key, m.fields, {**m.detail, "command": cost.command(m.fields)})
                took = f"measured, guest {m.detail['host_seconds']:.0f} s"
                click.echo(line(m.fields, m.figures.as_dict(), took))
    except (StoreError, ConfigError, cost.CostError, ProvisionError, MachineError, RecordError) as e:
        raise CrashlabError(str(e)) from None
    except OSError as e:  # --out not a directory we can make, a full disk
        raise CrashlabError(f"{e.filename or work}: {e.strerror}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if resolved == "tcg":
        click.echo("TCG: an emulated CPU; these figures compare modes within this run, not with real disks")


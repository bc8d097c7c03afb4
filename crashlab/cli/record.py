"""`crashlab record`: run a workload in a disposable guest and keep its log (or, with --fault, a live
dm-flakey fault and the image it leaves)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import click

from crashlab import hostrecord
from crashlab.cachemodes import CACHE_MODES, cache_mode
from crashlab.cli import CrashlabError, shipped
from crashlab.filesystems import DATA_MODES, FILESYSTEMS
from crashlab.guest.machine import MachineError
from crashlab.guest.provision import ProvisionError, provision
from crashlab.hostdm import HostDmError
from crashlab.record import (
    TRANSPORTS,
    ConfigError,
    RecordConfig,
    RecordError,
    record,
    timings,
)
from crashlab.recorders import LOGGING, Recorder, recorder


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so the Machine context manager stops QEMU and removes its temp dir.
    raise KeyboardInterrupt


@click.command("record")
@click.option("--fs", type=click.Choice(list(FILESYSTEMS)), default="ext4", show_default=True)
@click.option("--cache", type=click.Choice(list(CACHE_MODES)), default="writeback", show_default=True,
              help="QEMU cache mode of the data disk.")
@click.option("--barrier", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="ext4/ext3 barrier=0 / btrfs nobarrier when off (XFS has no such option).")
@click.option("--data", "data_mode", type=click.Choice(DATA_MODES), default="ordered",
              show_default=True, help="ext4/ext3 data= mode (others have none: leave the default).")
@click.option("--recorder", "recorder_name", type=click.Choice([r.value for r in LOGGING]), default="dm",
              show_default=True,
              help="qemu: blklogwrites below the virtio disk; dm: dm-log-writes in the guest; host-dm: "
                   "dm-log-writes on the host under the image file (what the host page cache wrote).")
@click.option("--workload", default="smallfiles", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=int, default=1, show_default=True)
@click.option("--disk-mib", type=int, default=None, help="Data disk size (default per filesystem).")
@click.option("--memory-mib", type=int, default=512, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "tcg", "kvm"]), default="auto", show_default=True,
              help="auto: KVM only if a short probe boot succeeds.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Hard limit for the guest, seconds.")
@click.option("--fault", type=click.Choice(["drop_writes", "error_writes", "error_reads"]), default=None,
              help="A live dm-flakey fault instead of a recording.")
@click.option("--fault-after", type=float, default=None,
              help="Seconds after workload-start (default: drawn from the seed).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your own kernel image (with --modules).")
@click.option("--modules", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Its lib/modules/VERSION directory.")
@click.option("--qemu", default=None, help="qemu-system-x86_64 to use (default: from PATH).")
@click.option("--transport", type=click.Choice(TRANSPORTS), default="auto", show_default=True,
              help="How project code reaches the guest: virtiofs (the host's Python), or shell (busybox "
                   "only: the built-in sh-smallfiles workload, qemu recorder, ext4); auto = shell only "
                   "when there is no virtiofsd.")
@click.option("--nested", is_flag=True, default=False,
              help="host-dm on a host without device-mapper: an outer guest plays the host.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@shipped.options(build=False)
def command(fs: str, cache: str, barrier: str, data_mode: str, recorder_name: str, workload: str, seed: int,
            scale: int, disk_mib: int | None, memory_mib: int, accel: str, timeout_s: float,
            fault: str | None, fault_after: float | None, kernel: Path | None, modules: Path | None,
            qemu: str | None, transport: str, nested: bool, out_dir: Path, **drive_options: Any) -> None:
    """Record WORKLOAD in a disposable guest into --out: write.log, data.img, promises.jsonl,
    console.log and run.json (every option and version)."""
    drive = shipped.take({**drive_options, "kernel": kernel, "modules": modules, "qemu": qemu})
    cache = drive.pop("cache", cache)
    # click checked every name against its table: these lookups cannot fail.
    config = RecordConfig(fs=fs, cache=cache_mode(cache), barrier=barrier == "on", data_mode=data_mode,
                          recorder=Recorder.NONE if fault else recorder(recorder_name), workload=workload,
                          seed=seed, scale=scale, disk_mib=disk_mib, memory_mib=memory_mib, accel=accel,
                          timeout_s=timeout_s, transport=transport, nested=nested, **drive)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        config.validate()
        guest = provision(kernel=config.kernel or None, modules=config.modules or None)
        if fault:
            from crashlab.flakey import FlakeyConfig, inject

            res = inject(FlakeyConfig(base=config, mode=fault, after_s=fault_after), out_dir,
                         guest=guest, qemu=config.qemu or None)
            mk = res.last_marker
            click.echo(f"{fault} {res.fault_after_s:.3f} s after workload-start; last marker on the "
                       f"image: {f'{mk.name} (seq {mk.seq})' if mk else 'none'}; image {res.image}")
            return
        if config.recorder is Recorder.HOST_DM:
            rec = hostrecord.record(config, out_dir, guest=guest, qemu=config.qemu or None)
        else:
            rec = record(config, out_dir, guest=guest)
    except (ConfigError, ValueError, ProvisionError, MachineError, RecordError, HostDmError) as e:
        raise CrashlabError(str(e)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = rec.summary
    t = timings(rec.run)
    click.echo(f"{config.describe()}: {s.get('entries', 0)} entries, {s.get('writes', 0)} writes, "
               f"{s.get('flushes', 0)} flushes, {s.get('fua', 0)} FUA, {s.get('markers', 0)} markers; "
               f"workload-start at {t.get('workload_start_s', 0):.1f} s after boot; "
               f"host {rec.run['host_seconds']:.1f} s")
    if config.recorder is Recorder.HOST_DM:
        hd = rec.run["host_dm"]
        mp = hd.get("map", {})
        click.echo(f"host-dm on {hd['host']}: {mp.get('image_writes', 0)} image writes kept, "
                   f"{mp.get('host_fs_writes', 0)} host-filesystem writes dropped, "
                   f"{mp.get('flushes', 0)} host flushes")
        click.echo(f"wrote {rec.out_dir}/{{write.log,data.img,host-device.log,run.json}} and "
                   f"{rec.out_dir}/{hostrecord.INNER}/ (the same run through the qemu recorder)")
        return
    click.echo(f"wrote {rec.out_dir}/{{write.log,data.img,promises.jsonl,console.log,run.json}}")

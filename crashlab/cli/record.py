"""`crashlab record`: run a workload in a disposable guest and keep its log (or, with --fault, a live
dm-flakey fault and the image it leaves)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import click

from crashlab import hostrecord, netfaults
from crashlab.cachemodes import CACHE_MODES, cache_mode
from crashlab.cli import CrashlabError, shipped
from crashlab.filesystems import DATA_MODES, FILESYSTEMS
from crashlab.guest.machine import MachineError
from crashlab.guest.provision import Guest, ProvisionError, provision
from crashlab.hostdm import HostDmError
from crashlab.nbd import STORAGES
from crashlab.netfaults import Fault, FaultConfig
from crashlab.record import (
    TRANSPORTS,
    ConfigError,
    RecordConfig,
    RecordError,
    record,
    timings,
)
from crashlab.recorders import LOGGING, Recorder, recorder


def _net_faults(plan: FaultConfig, out_dir: Path, guest: Guest, qemu: str | None) -> None:
    res = netfaults.inject(plan, out_dir, guest=guest, qemu=qemu)
    for a in res.applied:
        at = f"at {a.at_s:.3f} s" if a.at_s is not None else "never"
        click.echo(f"fault {a.fault}: {at}{f' ({a.error})' if a.error else ''}")
    seen = res.seen
    click.echo(f"guest saw: EIO {'yes' if seen['eio'] else 'no'}, read-only remount "
               f"{'yes' if seen['remounted_ro'] else 'no'}, workload exit {seen['workload_status']}"
               + (f" ({seen['workload_error']})" if seen["workload_error"] else ""))
    click.echo(f"server's final image: {res.outcome}: {res.reason}")
    click.echo(f"wrote {res.out_dir}/{{write.log,data.img,promises.jsonl,console.log,run.json}}")


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
@click.option("--recorder", "recorder_name", type=click.Choice([r.value for r in LOGGING]), default=None,
              help="qemu: blklogwrites below the virtio disk (with --storage nbd: on the server); dm: "
                   "dm-log-writes in the guest; host-dm: dm-log-writes on the host under the image file "
                   "(what the host page cache wrote) [default: dm; qemu with --storage nbd].")
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
@click.option("--storage", type=click.Choice(list(STORAGES)), default="local", show_default=True,
              help="nbd: the data disk is an NBD export of qemu-storage-daemon in a network namespace, "
                   "logged on the server (recorder qemu).")
@click.option("--reconnect-delay", "reconnect_delay_s", type=click.IntRange(0, 3600), default=0,
              show_default=True, help="nbd: seconds the guest's QEMU waits for a lost server.")
@click.option("--net-fault", "net_faults", multiple=True, metavar="ACTION[=VALUE]@WHEN",
              help="nbd: a network storage fault, e.g. server-kill@1.5s, link-down@mark:fsync-3, "
                   "rate=1mbit@0s, loss=0.05@0s, server-restart@3s (repeat; run in order). The server's "
                   "final image is then checked.")
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
def command(fs: str, cache: str, barrier: str, data_mode: str, recorder_name: str | None, workload: str,
            seed: int, scale: int, disk_mib: int | None, memory_mib: int, accel: str, timeout_s: float,
            fault: str | None, fault_after: float | None, storage: str, reconnect_delay_s: int,
            net_faults: tuple[str, ...], kernel: Path | None, modules: Path | None,
            qemu: str | None, transport: str, nested: bool, out_dir: Path, **drive_options: Any) -> None:
    """Record WORKLOAD in a disposable guest into --out: write.log, data.img, promises.jsonl,
    console.log and run.json (every option and version)."""
    drive = shipped.take({**drive_options, "kernel": kernel, "modules": modules, "qemu": qemu})
    cache = drive.pop("cache", cache)
    # click checked every name against its table: these lookups cannot fail.
    # Over NBD the log is the server's: blklogwrites there is the recorder that means anything.
    logged_by = recorder(recorder_name or ("qemu" if storage == "nbd" else "dm"))
    config = RecordConfig(fs=fs, cache=cache_mode(cache), barrier=barrier == "on", data_mode=data_mode,
                          recorder=Recorder.NONE if fault else logged_by, workload=workload,
                          seed=seed, scale=scale, disk_mib=disk_mib, memory_mib=memory_mib, accel=accel,
                          timeout_s=timeout_s, transport=transport, nested=nested, storage=storage,
                          reconnect_delay_s=reconnect_delay_s, **drive)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        config.validate()
        faults = tuple(Fault.parse(f) for f in net_faults)
        plan = FaultConfig(config, faults).validate() if faults else None
        guest = provision(kernel=config.kernel or None, modules=config.modules or None)
        if plan is not None:
            _net_faults(plan, out_dir, guest, config.qemu or None)
            return
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

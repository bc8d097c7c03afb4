"""`crashlab worker`: make this machine a campaign worker of a Dask scheduler.

It provisions the guest kernel first (what `crashlab guest provision` does), so the first unit
does not pay for it, then becomes `dask worker` with one thread a worker and the resources this
machine has (`qemu`, `kvm` where the probe boots: crashlab.cluster.resources_here).
"""

from __future__ import annotations

import os
import sys

import click

from crashlab import cluster
from crashlab.cli import CrashlabError
from crashlab.guest.provision import ProvisionError, provision


def worker_argv(address: str, nworkers: int, resources: dict[str, float], extra: tuple[str, ...] = ()
                ) -> list[str]:
    """The `dask worker` command line (pure): one thread a worker, one unit at a time each."""
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
            "--nworkers", str(nworkers), *cluster.resource_args(resources), *extra]


@click.command("worker", context_settings={"ignore_unknown_options": True})
@click.option("--scheduler", required=True, metavar="tcp://HOST:PORT", help="The Dask scheduler to join.")
@click.option("-j", "--workers", "nworkers", type=click.IntRange(1, 1024), default=None,
              help="Worker processes on this machine [default: usable cores].")
@click.option("--no-provision", is_flag=True, help="Skip provisioning the guest kernel (already done).")
@click.option("--dry-run", is_flag=True, help="Print the dask worker command instead of running it.")
@click.argument("dask_args", nargs=-1, type=click.UNPROCESSED)
def command(scheduler: str, nworkers: int | None, no_provision: bool, dry_run: bool,
            dask_args: tuple[str, ...]) -> None:
    """Join a Dask scheduler as crashlab workers (arguments after -- go to `dask worker`).

    \b
    On the scheduler's machine:  dask scheduler --port 8786
    On each worker machine:      crashlab worker --scheduler tcp://SCHEDULER:8786
    Then, from anywhere:         crashlab matrix --scheduler tcp://SCHEDULER:8786 ...
    """
    try:
        address = cluster.parse_address(scheduler)
    except cluster.ClusterError as e:
        raise CrashlabError(str(e)) from None
    has_qemu = cluster.qemu_available()
    if has_qemu and not no_provision:
        try:
            g = provision()
        except ProvisionError as e:
            raise CrashlabError(f"guest provision: {e}") from None
        click.echo(f"guest {g.key}: kernel {g.kernel_version}", err=True)
    resources = cluster.resources_here() if has_qemu else {}
    if not has_qemu:
        click.echo("warning: no qemu-system-x86_64 here: these workers take only units that boot no "
                   "guest (ext4 checked in userspace)", err=True)
    argv = worker_argv(address, nworkers or len(os.sched_getaffinity(0)), resources,
                       tuple(a for a in dask_args if a != "--"))
    if dry_run:
        click.echo(" ".join(argv))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)

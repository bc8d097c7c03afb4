"""`crashlab gate`: may this cache policy become the default? Exit status says (see crashlab.gate)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from crashlab import cluster, gate, stats
from crashlab.campaign import MAX_STATES, MAX_WORKERS, CampaignError, Cell
from crashlab.cli import CrashlabError, shipped
from crashlab.filesystems import FILESYSTEMS
from crashlab.store import DEFAULT_PATH, Store, StoreError


@click.command("gate", epilog=f"""\b
Exit status:
  {gate.EXIT_PASS}  pass: no state of the policy was corrupt or lost fsynced data
  {gate.EXIT_REFUSED}  refused: some state was (each is listed with its reproduce command)
  {gate.EXIT_USAGE}  usage error
  {gate.EXIT_BLIND}  gate broken: the known-unsafe configuration showed no failure either
  {gate.EXIT_INCONCLUSIVE}  inconclusive: states missing or not checked (rerun to resume and retry
     them), or too few to bound the failure rate below --max-rate (the verdict
     says how many would)""")
@click.option("--fs", default="ext4", show_default=True,
              help=f"Filesystems, comma-separated: {', '.join(FILESYSTEMS)}.")
@click.option("--cache", default="none", show_default=True, help="The proposed cache mode.")
@click.option("--barrier", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option("--states", type=click.IntRange(1, MAX_STATES), default=None,
              help="Crash states per cell [default: as many as can pass at --max-rate, 299 at 1 %].")
@click.option("--workload", default="smallfiles", show_default=True)
@click.option("--recorder", default="qemu", show_default=True)
@click.option("--storage", default="local", show_default=True,
              help="local, or nbd: the policy's disks are NBD exports, logged on their server.")
@click.option("--window", default="default", show_default=True,
              help="Volatility window of the policy's cells: seconds, 'inf' or the cache mode's default.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--scale", type=click.IntRange(1), default=1, show_default=True)
@click.option("--strategy", default="random", show_default=True,
              help="Crash-state strategy. 'prefix' persists no volatile write: a deliberately blind "
                   "model, which the sensitivity check must catch.")
@click.option("--max-rate", type=click.FloatRange(0, 100, min_open=True), default=100 * gate.DEFAULT_MAX_RATE,
              show_default=True, metavar="PERCENT",
              help="Pass only if each cell's exact 95 % upper bound on its failure rate is below this "
                   "(1 % takes 299 states without a failure).")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="Also run ext4 cache=unsafe barrier=off, which must fail, to prove the gate can see "
                   "failures.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=DEFAULT_PATH,
              show_default=True, help="Results store; recordings go beside it. Reused across runs.")
@click.option("-j", "--workers", type=click.IntRange(1, MAX_WORKERS), default=None,
              help="Parallel units [default: cores].")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on this Dask scheduler's workers (crashlab worker) instead of a cluster "
                   "started here; the store stays on this machine.")
@click.option("--unit-states", type=click.IntRange(1), default=None,
              help="States per checker-guest boot.")
@click.option("--host-mount", is_flag=True,
              help="Mount crash images on this host, not in a checker guest (disposable hosts only).")
@click.option("--before", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A proposed change: the libvirt domain (or <disk>) XML as it is now (with --after).")
@click.option("--after", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The XML as proposed: the gate decides on it, and compares it with --before "
                   "(Fisher's exact test per filesystem, Holm-adjusted).")
@shipped.options()
def command(fs: str, cache: str, barrier: str, states: int | None, workload: str, recorder: str, storage: str,
            window: str, seed: int, scale: int, strategy: str, max_rate: float, sensitivity: bool,
            store_path: Path, workers: int | None, scheduler: str | None, unit_states: int | None,
            host_mount: bool, before: Path | None, after: Path | None, **drive_options: Any) -> None:
    """Refuse a cache policy if any crash state is corrupt or loses fsynced data.

    Records the policy's cells (or reuses them from the store), checks STATES crash states each,
    prints each cell's observed failure rate with its exact 95 % upper bound, and lists every
    failing state with its fsck output and the command that reproduces it. With --before/--after,
    the policy is the --after XML's disk, and the --before one is run beside it for comparison.
    """
    if (before is None) != (after is None):
        raise CrashlabError("--before and --after go together: the domain XML now and as proposed")
    if before is not None and (drive_options.get("domain_xml") or drive_options.get("disk_xml")):
        raise CrashlabError("--before/--after name the disks: leave out --domain-xml/--disk-xml")
    if scheduler and workers:
        raise CrashlabError("-j sizes the cluster started on this machine; with --scheduler the "
                            "cluster's workers run the units")
    drive = shipped.take(drive_options)
    specs = (shipped.xml_spec(before, None), shipped.xml_spec(after, None))
    pair = (specs[0].cell_fields(), specs[1].cell_fields()) if specs[0] and specs[1] else None
    if pair and (clash := [k for k in ("cache", *shipped.DISK_KEYS) if k in drive or shipped.explicit(k)]):
        raise CrashlabError(f"--{clash[0].replace('_', '-')} and --before/--after both set it: give one")
    try:
        fields = dict(cache=drive.pop("cache", cache), barrier=barrier, workload=workload, recorder=recorder,
                      window=window, seed=seed, scale=scale, strategy=strategy, storage=storage, **drive)
        cell = Cell.parse({**fields, **(pair[1] if pair else {})})
        states = states or stats.states_needed(max_rate / 100)
        policy = gate.Policy(cell, fs=tuple(f.strip() for f in fs.split(",") if f.strip()), states=states,
                             sensitivity=sensitivity, max_rate=max_rate / 100)
        cells = policy.cells()
        old = replace(policy, cell=Cell.parse({**fields, **pair[0]})).cells() if pair else []
        reference = policy.sensitivity_cell() if policy.sensitivity else None
        address = cluster.parse_address(scheduler) if scheduler else None
        if address:
            cluster.probe(address)  # before the store is written
    except (CampaignError, cluster.ClusterError) as e:
        raise CrashlabError(str(e)) from None
    try:
        _gate(cell, barrier, workload, policy, cells, reference, store_path, workers, unit_states, host_mount,
              old, address)
    except (StoreError, cluster.ClusterError) as e:
        raise CrashlabError(str(e)) from None


def _gate(cell: Cell, barrier: str, workload: str, policy: gate.Policy, cells: list[Cell],
          reference: Cell | None, store_path: Path, workers: int | None, unit_states: int | None,
          host_mount: bool, before: list[Cell], scheduler: str | None) -> None:
    Store(store_path).close()  # a path that cannot hold a store is refused before any guest boots
    click.echo(f"crashlab gate: cache={cell.cache.name} barrier={barrier} on {', '.join(policy.fs)}, "
               f"workload {workload}, {policy.states} crash states per cell, max rate "
               f"{gate.percent(policy.max_rate)} at 95 %, store {store_path}")
    if policy.states < (need := stats.states_needed(policy.max_rate)):
        click.echo(f"warning: {policy.states} states without a failure bound the rate only below "
                   f"{100 * stats.upper_bound_zero(policy.states):.1f} %: this gate cannot pass; "
                   f"at --max-rate {gate.percent(policy.max_rate)} it needs --states {need}", err=True)
    if before:
        click.echo(f"change: before {', '.join(gate.names(c) for c in before[:1])}; "
                   f"after {', '.join(gate.names(c) for c in cells[:1])}")
    prog = gate.run_cells([*before, *cells, *([reference] if reference else [])], policy.states, store_path,
                          command="crashlab " + shlex.join(sys.argv[1:]), workers=workers,
                          host_mount=host_mount, unit_states=unit_states, scheduler=scheduler)
    for problem in prog.failed_units:
        click.echo(f"error: {problem}", err=True)
    with Store(store_path) as store:
        checks = [gate.check(store, c, policy.states) for c in cells]
        old = [gate.check(store, c, policy.states) for c in before]
        decision = gate.decide(checks, gate.check(store, reference, policy.states) if reference else None,
                               policy.max_rate)
    bad = gate.worst_first([row for c in checks for row in c.failures])
    for line in [f"before   {c.describe()}" for c in old] + decision.lines:
        click.echo(line)
    for line in gate.compare(old, checks) if old else []:
        click.echo(line)
    for row in bad[:gate.STATES_DESCRIBED]:
        click.echo("\n" + gate.describe_state(row, store_path, host_mount))
    if len(bad) > gate.STATES_DESCRIBED:
        click.echo(f"\n... and {len(bad) - gate.STATES_DESCRIBED} more: "
                   + " ".join(r.state_id for r in bad[gate.STATES_DESCRIBED:]))
    click.echo(("\n" if bad else "") + decision.verdict)
    sys.exit(decision.code)

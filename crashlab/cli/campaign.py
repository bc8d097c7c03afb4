"""`crashlab run`, `matrix`, `report` and `reproduce`: the main job and what reads its results."""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from crashlab import campaign, cluster, export, report
from crashlab.cachemodes import CACHE_MODES
from crashlab.check.describe import describe_failure
from crashlab.check.runner import CHECKERS
from crashlab.cli import CrashlabError, shipped
from crashlab.export import ExportError
from crashlab.filesystems import FILESYSTEMS
from crashlab.record import GuestOutputs
from crashlab.store import DEFAULT_PATH, Store, StoreError


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _store_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--store", "store_path", type=click.Path(path_type=Path), default=DEFAULT_PATH,
                        show_default=True, help="SQLite results store.")(f)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--states", type=click.IntRange(1, campaign.MAX_STATES), default=None,
                     help=f"Crash states per cell [default: {campaign.Matrix.states}]."),
        click.option("--seed", type=int, default=None, help="Workload and crash-state seed [default: 1]."),
        click.option("--scale", type=click.IntRange(1), default=None,
                     help="Workload size (1 = small) [default: 1]."),
        click.option("--window", default=None,
                     help="Volatility window(s) in seconds or 'inf', comma-separated [default: per mode]."),
        click.option("--torn", default=None, help="Torn-write atomic unit(s): 0, 512, 4096."),
        click.option("--strategy", default=None, help="Crash-point strategy [default: random]."),
        click.option("-j", "--workers", type=click.IntRange(1, campaign.MAX_WORKERS), default=None,
                     help="Workers of the cluster started on this machine [default: usable cores]."),
        click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                     help="Run on this Dask scheduler's workers (crashlab worker) instead of a cluster "
                          "started here; the results store stays on this machine."),
        click.option("--shared-recordings", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="With --scheduler: a directory every worker sees at the same path, for the "
                          "recordings [default: ship them to the workers, compressed]."),
        click.option("--unit-states", type=click.IntRange(1), default=campaign.STATES_PER_UNIT,
                     show_default=True,
                     help="States per check unit (a worker builds and checks them together; at most "
                          "this many are lost per worker on an interrupt)."),
        click.option("--host-mount", is_flag=True,
                     help="Mount crash images on this host, not in a checker guest (disposable hosts only)."),
        click.option("--checker", type=click.Choice(CHECKERS), default="auto", show_default=True,
                     help="Where states are judged: auto = ext4 in userspace (no mount), XFS and btrfs in "
                          "a checker guest; userspace; guest; host (= --host-mount)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress display (CI)."),
        _store_option,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


# Exit statuses of `matrix` and `run`, beside the shared ones (crashlab.cli): the table is printed
# in every case; a failed unit leaves states missing, a checker-error leaves them unchecked.
EXIT_FAILED_UNITS = 1  # a recording or check unit failed: its states are missing
EXIT_UNCHECKED = 4  # states ended checker-error (like the gate's EXIT_INCONCLUSIVE): rerun to retry
EXIT_EPILOG = f"""\b
Exit status:
  0  every state was checked (the table says how each ended)
  {EXIT_FAILED_UNITS}  a recording or check unit failed: its states are missing (stderr says why)
  2  usage error
  {EXIT_UNCHECKED}  some states could not be checked (checker-error: its guest did not boot, was
     killed, or the check itself failed); stderr counts them by cause; rerunning retries them"""


def _run(matrix: campaign.Matrix, store_path: Path, workers: int | None, unit_states: int,
         checker: str, quiet: bool) -> None:
    try:
        cells = matrix.cells()
        scheduler = cluster.parse_address(matrix.scheduler) if matrix.scheduler else None
    except (campaign.CampaignError, cluster.ClusterError) as e:
        raise CrashlabError(str(e)) from None
    if scheduler and workers:
        raise CrashlabError("-j sizes the cluster started on this machine; with --scheduler the "
                            "cluster's workers run the units")
    shared = Path(matrix.shared_recordings).absolute() if matrix.shared_recordings else None
    if shared and not scheduler:
        raise CrashlabError("--shared-recordings goes with --scheduler (workers here share this disk)")
    if scheduler:
        try:
            cluster.probe(scheduler)  # before the store is written
        except cluster.ClusterError as e:
            raise CrashlabError(str(e)) from None
    # The store keeps the matrix as an explicit command: what was typed may lean on defaults.
    command = matrix.command()
    where = {"scheduler": scheduler, "workers": workers, "shared_recordings": shared}
    try:
        _run_in(matrix, cells, command, store_path, where, unit_states, checker, quiet)
    except (StoreError, cluster.ClusterError) as e:
        raise CrashlabError(str(e)) from None


def _run_in(matrix: campaign.Matrix, cells: list[campaign.Cell], command: str, store_path: Path,
            where: dict[str, Any], unit_states: int, checker: str, quiet: bool) -> None:
    with Store(store_path) as store:
        if quiet:
            prog = campaign.run_matrix(cells, matrix.states, store, store_path.parent, command=command,
                                       unit_states=unit_states, checker=checker, **where)
        else:
            prog = _with_progress(cells, matrix, store, store_path, command, where, unit_states, checker)
        results = report.results(store, None)
        keys = {c.key for c in cells}
        mine = [r for r in results if r.cell in keys]
        report.terminal(mine) if not quiet else click.echo(report.markdown(mine))
    for failure in prog.failed_units:
        click.echo(f"error: {failure}", err=True)
    if prog.unchecked:
        click.echo(f"error: {unchecked_text(prog)}; rerun the same command to retry them", err=True)
    if prog.failed_units:
        raise SystemExit(EXIT_FAILED_UNITS)
    if prog.unchecked:
        raise SystemExit(EXIT_UNCHECKED)


def unchecked_text(prog: campaign.Progress) -> str:
    causes = ", ".join(f"{n} {why}" for why, n in prog.unchecked.most_common())
    return f"{sum(prog.unchecked.values())} state(s) could not be checked: {causes}"


def _with_progress(cells: list[campaign.Cell], matrix: campaign.Matrix, store: Store, store_path: Path,
                   command: str, where: dict[str, Any], unit_states: int,
                   checker: str) -> campaign.Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    def run(show: Callable[[campaign.Progress], None]) -> campaign.Progress:
        return campaign.run_matrix(cells, matrix.states, store, store_path.parent, command=command,
                                   unit_states=unit_states, checker=checker, on_progress=show, **where)

    if not Console(stderr=True).is_terminal:
        return run(_progress_lines(len(cells)))
    # rich's own remaining-time column averages over everything, recording included: ours is
    # the checking rate (campaign.Progress.rate).
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}")) as bar:
        rec_task = bar.add_task("cells recorded", total=len(cells), rate="")
        st_task = bar.add_task("states checked", total=len(cells) * matrix.states, rate="")

        told = [False]

        def show(p: campaign.Progress) -> None:
            if p.dashboard and not told[0]:
                bar.console.print(f"dask dashboard: {p.dashboard}", markup=False, highlight=False)
                told[0] = True
            for f in p.arrived:
                bar.console.print(finding_line(f), markup=False, highlight=False)
            bar.update(rec_task, completed=p.recorded, rate=f"now: {p.current}" if p.current else "")
            bar.update(st_task, completed=p.states_done, total=p.total, rate=rate_text(p))

        return run(show)


def rate_text(p: campaign.Progress) -> str:
    """Checking rate and time left, or '' before the first check unit has finished."""
    if p.eta is None:
        return ""
    left = f", about {_duration(p.eta)} of checking left" if p.eta else ""
    return f"{p.rate:.2f} states/s{left}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def finding_line(f: campaign.Finding) -> str:
    """One state that did not come out consistent, as it arrives."""
    reason = " ".join(f.reason.split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return f"{f.outcome}: {f.cell.label}: state {f.state_id}: {reason}"


def _progress_lines(cells: int, every_s: float = 15.0) -> Callable[[campaign.Progress], None]:
    """Progress for a log file or a CI console: every state that did not come out consistent as
    it arrives; a plain progress line when something changed, at most every `every_s` seconds, and
    always when the work is done."""
    last_at, last_state = [-math.inf], [(-1, -1)]  # the first line at once, however young the clock

    def show(p: campaign.Progress) -> None:
        if p.dashboard and last_at[0] == -math.inf:
            click.echo(f"dask dashboard: {p.dashboard}", err=True)
        for f in p.arrived:
            click.echo(finding_line(f), err=True)
        now = time.monotonic()
        state = (p.recorded, p.states_done)
        done = p.recorded == cells and p.states_done >= p.total
        if state == last_state[0] or (now - last_at[0] < every_s and not done):
            return
        last_at[0], last_state[0] = now, state
        rate = rate_text(p)
        current = f"; {p.current}" if p.current and not done else ""
        click.echo(f"progress: cells recorded {p.recorded}/{cells}, states checked {p.states_done}/{p.total}"
                   + (f" ({rate})" if rate else "") + current, err=True)

    return show


def _matrix_from(options: dict[str, Any], base: campaign.Matrix) -> campaign.Matrix:
    """The matrix the options ask for; the shared disk and build options (crashlab.cli.shipped)
    are taken out of `options` first, a libvirt XML's cache mode included."""
    drive = shipped.take(options, lists=True)
    overrides: dict[str, Any] = {}
    for key in ("fs", "cache", "barrier", "recorder", "workload", "window", "storage"):
        if (v := _csv(options.get(key))) is not None:
            overrides[key] = v
    if (v := _csv(options.get("torn"))) is not None:
        try:
            overrides["torn"] = tuple(int(x) for x in v)
        except ValueError:
            raise CrashlabError(f"--torn {options['torn']!r}: expected 0, 512 or 4096") from None
    for key in ("states", "seed", "scale", "strategy", "scheduler"):
        if options.get(key) is not None:
            overrides[key] = options[key]
    if options.get("shared_recordings") is not None:
        overrides["shared_recordings"] = str(options["shared_recordings"])
    return replace(base, **{**overrides, **drive})


@click.command("matrix", epilog=EXIT_EPILOG)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with the matrix (keys as the options below); options override it.")
@click.option("--fs", help=f"Filesystems, comma-separated: {', '.join(FILESYSTEMS)} [default: ext4].")
@click.option("--cache", help=f"Cache modes [default: all: {','.join(CACHE_MODES)}].")
@click.option("--barrier", help="on, off or on,off [default: on,off].")
@click.option("--recorder", help="qemu, dm [default: qemu].")
@click.option("--workload", help=f"Workloads [default: {','.join(campaign.DEFAULT_WORKLOADS)}].")
@click.option("--storage", help="local, nbd or local,nbd: the guest's disk a local file, or an NBD export "
                                "logged on its server [default: local].")
@shipped.options(lists=True)
@_common
def matrix_command(config_file: Path | None, workers: int | None, unit_states: int, host_mount: bool,
                   checker: str, quiet: bool, store_path: Path, **options: Any) -> None:
    """Run (or resume) a matrix of cells and print the table.

    Rerunning the same command resumes: recordings and stored outcomes are reused.
    """
    try:
        bases = campaign.load_matrices(config_file) if config_file else [campaign.Matrix()]
        # Every block's cells are checked before the first one runs.
        matrices = [_matrix_from(dict(options), base) for base in bases]
        for m in matrices:
            m.cells()
    except campaign.CampaignError as e:
        raise CrashlabError(str(e)) from None
    status = 0
    for m in matrices:  # one after the other, each resumable as a matrix of its own
        try:
            _run(m, store_path, workers, unit_states, "host" if host_mount else checker, quiet)
        except SystemExit as e:  # a block's failed units or unchecked states: the next block still runs
            if e.code not in (EXIT_FAILED_UNITS, EXIT_UNCHECKED) or len(matrices) == 1:
                raise
            status = EXIT_FAILED_UNITS if EXIT_FAILED_UNITS in (status, e.code) else EXIT_UNCHECKED
    if status:
        raise SystemExit(status)


@click.command("run", epilog=EXIT_EPILOG)
@click.option("--fs", default="ext4", show_default=True)
@click.option("--cache", default="writeback", show_default=True)
@click.option("--barrier", default="on", show_default=True)
@click.option("--recorder", default="qemu", show_default=True)
@click.option("--workload", default="smallfiles", show_default=True)
@click.option("--storage", default="local", show_default=True,
              help="local, or nbd: the disk an NBD export of a storage server in a network namespace.")
@shipped.options()
@_common
def run_command(workers: int | None, unit_states: int, host_mount: bool, checker: str, quiet: bool,
                store_path: Path, **options: Any) -> None:
    """Run (or resume) one configuration."""
    for key in ("fs", "cache", "barrier", "recorder", "workload", "storage", "disk", "aio"):
        if "," in (options[key] or ""):
            raise CrashlabError(f"--{key}: one value for `run`; use `crashlab matrix` for several")
    _run(_matrix_from(options, campaign.Matrix()), store_path, workers, unit_states,
         "host" if host_mount else checker, quiet)


@click.command("report")
@_store_option
@click.option("--from", "from_dir", type=click.Path(path_type=Path), default=None,
              help="Read an export (`crashlab export`, e.g. results/) instead of a store.")
@click.option("--format", "fmt", type=click.Choice(report.FORMATS), default="terminal", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here (required for png).")
@click.option("--all", "all_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Write every format into this directory ({', '.join(report.SHIPPED)}).")
@click.option("--where", multiple=True, metavar="KEY=VALUE", help="Only cells whose config matches.")
@click.option("--compare", nargs=2, metavar="CELL_A CELL_B",
              help="Fisher's exact test between two cells (each KEY=VALUE[,KEY=VALUE...]).")
def report_command(store_path: Path, from_dir: Path | None, fmt: str, output: Path | None,
                   all_dir: Path | None, where: tuple[str, ...], compare: tuple[str, str] | None) -> None:
    """Report the stored outcomes: rates with 95 % intervals per cell, and the 2008 thread's claims
    point by point (mail, json); the cost of safety beside them when the store has costs."""
    match = _parse_where(where)
    if fmt in ("png", "window-png", "cost-png") and output is None and all_dir is None:
        raise CrashlabError(f"--format {fmt} needs -o FILE.png")
    if all_dir is not None and not all_dir.is_dir():
        raise CrashlabError(f"--all {all_dir}: no such directory")
    try:
        with reading(store_path, from_dir) as store:
            cells = report.results(store, match)
            costs = report.cost_results(store, cells, match)
            if not cells and not (costs and fmt in ("mail", "markdown", "terminal", "cost-png")):
                raise CrashlabError("no stored states match")
            if compare:
                a, b = (_one(cells, spec) for spec in compare)
                click.echo(report.compare(a, b))
                return
            runs = store.runs()
            env = report.environment(store, cells)
    except (StoreError, ExportError) as e:
        raise CrashlabError(str(e)) from None
    commands = sorted({r["command"] for r in runs})
    if all_dir is not None:
        for name, kind in report.SHIPPED.items():
            if report.write(kind, cells, env, commands, all_dir / name, costs):
                click.echo(f"wrote {all_dir / name}")
        return
    if fmt == "terminal" and output is None:
        if cells:
            report.terminal(cells)
        if costs:
            click.echo(report.cost_markdown(costs), nl=False)
        return
    if output is None:
        click.echo(report.text(fmt, cells, env, commands, costs), nl=False)
    elif report.write(fmt, cells, env, commands, output, costs):
        click.echo(f"wrote {output}")
    elif fmt == "cost-png":
        raise CrashlabError("no costs stored (run `crashlab cost` first)")
    else:
        raise CrashlabError("no window-sweep cells match (an explicit --window, cache writeback or none)")


@contextlib.contextmanager
def reading(store_path: Path, from_dir: Path | None) -> Iterator[Store]:
    """The store to report from: the store itself, read-only, or an export restored to a temporary one."""
    if from_dir is None:
        with Store(store_path, readonly=True) as store:
            yield store
    else:
        with export.loaded(from_dir) as store:
            yield store


def _parse_where(where: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for w in where:
        k, sep, v = w.partition("=")
        if not sep:
            raise CrashlabError(f"--where {w!r}: expected KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def _one(cells: list[report.CellResult], spec: str) -> report.CellResult:
    match = _parse_where(spec.split(","))
    found = [c for c in cells if all(str(c.config.get(k)) == v for k, v in match.items())]
    if len(found) != 1:
        raise CrashlabError(f"--compare {spec!r} matches {len(found)} cells; name exactly one")
    return found[0]


@click.command("reproduce")
@click.argument("state_id")
@_store_option
@click.option("--keep", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Leave the rebuilt image here and print how to inspect it.")
@click.option("--host-mount", is_flag=True, help="Mount on this host instead of in a checker guest.")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Boot the checker guest on this kernel (with --modules) [default: the cell's, else "
                   "crashlab's].")
@click.option("--modules", type=click.Path(exists=True, file_okay=False), default=None,
              help="Its lib/modules/VERSION directory.")
@click.option("--qemu", default=None, help="qemu-system-x86_64 for the checker guest [default: the cell's].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the check record as JSON (alone on stdout: --keep's hint goes to stderr).")
def reproduce_command(state_id: str, store_path: Path, keep: Path | None, host_mount: bool,
                      kernel: str | None, modules: str | None, qemu: str | None, as_json: bool) -> None:
    """Rebuild a crash state's image from its id, rerun recovery and checks, print what was found.

    XFS and btrfs states recover in a checker guest booted on the cell's kernel and QEMU (or
    --kernel/--qemu): the recovery is that kernel's code."""
    if (kernel is None) != (modules is None):
        raise click.UsageError("--kernel and --modules go together (the modules must match the kernel)")
    try:
        with Store(store_path, readonly=True) as store:
            rows = store.find_state(state_id)
            found = list(campaign.state_rows(store, state_id))
    except StoreError as e:
        raise CrashlabError(str(e)) from None
    if not found:
        raise CrashlabError(f"state {state_id} is not in {store_path} (or its cell has no recording)")
    cell, recording = found[0]
    if kernel is not None:
        cell = replace(cell, kernel=kernel, modules=modules or "")
    if qemu is not None:
        cell = replace(cell, qemu=qemu)
    if not (log := GuestOutputs(recording).log).is_file():
        raise CrashlabError(f"state {state_id}: its recording {recording} has no {log.name}")
    if keep is not None and not keep.parent.is_dir():
        raise CrashlabError(f"--keep {keep}: no directory {keep.parent}")
    try:
        result = campaign.reproduce(cell, recording, state_id, keep=keep, host_mount=host_mount)
    except campaign.CampaignError as e:
        raise CrashlabError(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.detail, indent=2))
    else:
        click.echo(f"state     {state_id}\ncell      {cell.key}\nrecording {recording}")
        # All of it, not the gate's first lines: this is where a human comes to read everything.
        first, *rest = describe_failure(result.record, output_lines=None, violations=None)
        click.echo(first)
        if rows and rows[0].outcome != result.outcome:
            click.echo(f"stored    {rows[0].outcome} (differs: see the notes below)")
        for line in rest:
            click.echo(line)
    if keep:
        click.echo(f"\nimage kept at {keep}; inspect it with, e.g.:\n"
                   f"  e2fsck -fn {keep}        (ext4; xfs_repair -n / btrfs check --readonly)\n"
                   f"  debugfs -R 'ls -l /' {keep}\n"
                   f"  {shlex.join(check_argv(cell, recording, state_id, keep, host_mount))}", err=as_json)


def check_argv(cell: campaign.Cell, recording: Path, state_id: str, image: Path,
               host_mount: bool) -> list[str]:
    """The `crashlab check` command that judges a kept image as `reproduce` did: the state's own
    durability points present (derived from the log), not the workload's end state."""
    rec = GuestOutputs(recording)
    return ["crashlab", "check", str(image), "--fs", cell.fs, "--promises", str(rec.promises),
            "--log", str(rec.log), "--state-id", state_id, *(["--host-mount"] if host_mount else [])]


commands = [matrix_command, run_command, report_command, reproduce_command]

"""`crashlab workload`: list the workloads, run one on the host, check a tree against its promises,
and turn an op sequence into a standalone reproducer."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from crashlab.cli import CrashlabError


@click.group("workload")
def command() -> None:
    """Workloads run in the guest, and their fsync oracles."""


@command.command("list")
def list_() -> None:
    """Each workload and the first line of what it does."""
    from crashlab.workload import available

    for name in available():
        doc = (importlib.import_module(f"workloads.{name}").__doc__ or "").strip()
        click.echo(f"{name:16} {' '.join(doc.split(chr(10) + chr(10))[0].split())}")


@command.command()
@click.argument("tree", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("promises", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--after", type=int, default=None,
              help="Seq of the last in-band marker the crash state lies after (default: all, no crash).")
def check(tree: Path, promises: Path, after: int | None) -> None:
    """Check TREE (a workload's root after recovery) against PROMISES (promises.jsonl).

    Exits 1 if a promise is broken.
    """
    from crashlab.oracle import load_promises

    try:
        loaded = load_promises(promises)
    except (OSError, ValueError, KeyError) as e:
        raise CrashlabError(f"{promises}: cannot read promises: {e}") from None
    violations = loaded.check(tree, None if after is None else {after})
    for v in violations:
        click.echo(v.message)
    if violations:
        raise SystemExit(1)
    click.echo(f"ok: {len(loaded.points)} durability points, {len(loaded.promises)} promises")


@command.command()
@click.argument("ops_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def repro(ops_file: Path) -> None:
    """Print a standalone script making the syscalls of OPS_FILE (a JSON op list, as the `ops`
    workload reads it)."""
    from crashlab import opgen

    try:
        ops = opgen.loads(ops_file.read_text())
    except (ValueError, TypeError) as e:
        raise CrashlabError(f"{ops_file}: not an op list: {e}") from None
    click.echo(opgen.render_script(ops, f"crashlab reproducer from {ops_file.name}"), nl=False)


@command.command()
@click.option("--fs", default="ext4", show_default=True)
@click.option("--cache", default="unsafe", show_default=True)
@click.option("--barrier", default="on", show_default=True)
@click.option("--recorder", default="qemu", show_default=True)
@click.option("--window", default="default", show_default=True)
@click.option("--states", type=click.IntRange(1), default=8, show_default=True,
              help="Crash states checked per example.")
@click.option("--max-ops", type=click.IntRange(1), default=6, show_default=True)
@click.option("--examples", type=click.IntRange(1), default=20, show_default=True,
              help="Generated sequences to try (each records and checks in guests).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--host-mount", is_flag=True, help="Check on this host instead of in checker guests.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the minimal sequence here as JSON (for `crashlab workload repro`).")
def shrink(fs: str, cache: str, barrier: str, recorder: str, window: str, states: int, max_ops: int,
           examples: int, seed: int, host_mount: bool, output: Path | None) -> None:
    """Find a bounded op sequence whose crash states fail under this configuration, shrink it to a
    minimal one, and print it as a runnable script. Exits 1 when nothing failed."""
    from crashlab import campaign, opgen
    from crashlab.shrink import shrink as find

    try:
        cell = campaign.Cell.parse(dict(fs=fs, cache=cache, barrier=barrier, recorder=recorder,
                                        workload="ops", window=window, seed=seed)).validate()
    except campaign.CampaignError as e:
        raise CrashlabError(str(e)) from None
    tried = [0]

    def show(ops: list[opgen.Op], failed: bool) -> None:
        tried[0] += 1
        click.echo(f"example {tried[0]}: {len(ops)} ops, {'FAILS' if failed else 'survives'}", err=True)

    found = find(cell, states=states, max_ops=max_ops, examples=examples, seed=seed, host_mount=host_mount,
                 on_example=show)
    if found is None:
        click.echo(f"no failing sequence in {examples} examples of at most {max_ops} ops", err=True)
        raise SystemExit(1)
    if output:
        output.write_text(opgen.dumps(found))
    click.echo(opgen.render_script(found, f"crashlab: minimal workload failing under {cell.key}"), nl=False)

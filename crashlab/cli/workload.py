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

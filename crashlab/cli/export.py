"""`crashlab export`, `restore` and `compare-runs`: a store as the files results/ ships, back, and
two runs of one matrix side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from crashlab import export, report
from crashlab.cli import CrashlabError
from crashlab.cli.campaign import _store_option, reading
from crashlab.export import ExportError
from crashlab.store import Store, StoreError


@click.command("export")
@_store_option
@click.argument("dest", type=click.Path(path_type=Path))
def export_command(store_path: Path, dest: Path) -> None:
    """Write the store to DEST (e.g. results/): every recording as xz, every state's outcome, the
    runs and versions; `crashlab report --from DEST` rebuilds every report from them."""
    if dest.exists() and not dest.is_dir():
        raise CrashlabError(f"{dest}: not a directory")
    try:
        with Store(store_path, readonly=True) as store:
            written = export.export(store, dest)
    except (StoreError, ExportError) as e:
        raise CrashlabError(str(e)) from None
    click.echo(f"wrote {dest}: " + ", ".join(f"{n} {kind}" for kind, n in written.items()))


@click.command("restore")
@click.argument("src", type=click.Path(path_type=Path))
@_store_option
def restore_command(src: Path, store_path: Path) -> None:
    """Rebuild a store from an export, its recordings unpacked beside it (STORE's directory,
    recordings/), so `crashlab reproduce` rebuilds any state of it."""
    if store_path.exists():
        raise CrashlabError(f"{store_path}: exists: restore makes a new store")
    try:
        export.read_manifest(src)  # before anything is written
        with Store(store_path) as store:
            export.restore(src, store, store_path.parent / "recordings")
    except (StoreError, ExportError) as e:
        for p in (store_path, Path(f"{store_path}-wal"), Path(f"{store_path}-shm")):
            p.unlink(missing_ok=True)
        raise CrashlabError(str(e)) from None
    click.echo(f"restored {src} into {store_path}")


@contextlib.contextmanager
def _either(path: Path) -> Iterator[Store]:
    """A store file, or an export directory."""
    with reading(path, path if path.is_dir() else None) as store:
        yield store


@click.command("compare-runs")
@click.argument("first", type=click.Path(path_type=Path))
@click.argument("second", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
def compare_runs_command(first: Path, second: Path, output: Path | None) -> None:
    """Two runs of one matrix (each a store or an export directory), cell by cell: Fisher's exact
    test per cell, Holm-adjusted over the cells; which cells differ significantly."""
    try:
        with _either(first) as a, _either(second) as b:
            text = report.compare_runs(report.results(a), report.results(b))
    except (StoreError, ExportError) as e:
        raise CrashlabError(str(e)) from None
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(f"# crashlab compare-runs {first} {second}\n{text}")
        click.echo(f"wrote {output}")


commands = [export_command, restore_command, compare_runs_command]

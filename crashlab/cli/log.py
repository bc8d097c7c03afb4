"""`crashlab log`: inspect and replay dm-log-writes logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from crashlab import logformat
from crashlab.cli import EXIT_DAMAGED, CrashlabError, input_error, salvaged

sector_size_option = click.option(
    "--sector-size", type=click.Choice([str(s) for s in logformat.SECTOR_SIZES]), default=None,
    help="Log sector size when the superblock is blank and detection should be overridden.")


@click.group("log")
def command() -> None:
    """Inspect and replay dm-log-writes logs (kernel dm-log-writes or QEMU blklogwrites)."""


@command.command()
@click.argument("log", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--entries", is_flag=True, help="List every entry.")
@sector_size_option
def inspect(log: Path, as_json: bool, entries: bool, sector_size: str | None) -> None:
    """Count a log's entries, writes, bytes, flushes, FUA, discards and marks.

    Exits 1 if the log is damaged inside the entries its superblock promises, 2 if it is not a log.
    """
    with _Opened(log, sector_size) as reader:
        if entries and not as_json:
            for e in reader.entries():
                click.echo(e.describe())
        s = reader.summary()
        if as_json:
            out = s.as_dict()
            if entries:
                out["entry_list"] = [
                    {"index": e.index, "kind": e.kind, "flags": e.flags, "offset": e.offset,
                     "length": e.length, "name": e.mark or (e.marker.name if e.marker else None)}
                    for e in reader.entries()]
            click.echo(json.dumps(out, indent=2))
        else:
            _print_summary(log, s)
    if s.damage:
        click.echo(f"error: {log}: damaged log: {s.damage}", err=True)
        raise SystemExit(EXIT_DAMAGED)


def _print_summary(log: Path, s: logformat.Summary) -> None:
    table = Table(title=str(log), show_header=False, box=None)
    marks = ", ".join(s.marks[:3]) + (f", ... ({len(s.marks)} in all)" if len(s.marks) > 3 else "")
    sb = f"{s.superblock}" + (f", nr_entries {s.superblock_entries}" if s.superblock == "valid" else "")
    rows = [
        ("superblock", sb), ("sector size", str(s.sector_size)), ("entries", str(s.entries)),
        ("writes", f"{s.writes} ({s.bytes_written} bytes)"), ("flushes", str(s.flushes)),
        ("FUA", str(s.fua)), ("metadata", str(s.metadata)),
        ("discards", f"{s.discards} ({s.bytes_discarded} bytes)"),
        ("marks", f"{len(s.marks)}" + (f": {marks}" if s.marks else "")),
        ("in-band markers", f"{s.markers} ({s.ticks} ticks)"),
        ("recovered beyond superblock", str(s.recovered_beyond_superblock)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


class _Opened:
    """open_log as a context manager whose format errors become user errors."""

    def __init__(self, log: Path, sector_size: str | None) -> None:
        self._cm = logformat.open_log(log, int(sector_size) if sector_size else None)

    def __enter__(self) -> logformat.LogReader:
        try:
            return self._cm.__enter__()
        except logformat.InputError as e:
            raise input_error(e) from None

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)  # type: ignore[arg-type]


def stop_index(reader: logformat.LogReader, to: str) -> int:
    """How many entries to replay for a `--to` target.

    `all`; `entry:K` (the first K entries); `mark:NAME` (through the first native mark or in-band
    marker of that name); `flush:N` (through the N-th flush entry, from 1).
    """
    entries = reader.index()
    if to == "all":
        return len(entries)
    kind, _, arg = to.partition(":")
    # ASCII digits only, and few of them: str.isdigit() takes '²', int() then raises.
    number = int(arg) if re.fullmatch(r"[0-9]{1,18}", arg) else None
    if kind == "entry" and number is not None:
        if number > len(entries):
            raise CrashlabError(f"--to {to}: the log has only {len(entries)} entries")
        return number
    if kind == "mark" and arg:
        if (end := logformat.mark_end(entries, arg)) is None:
            raise CrashlabError(f"--to {to}: no mark or marker named {arg!r} in the log")
        return end
    if kind == "flush" and number is not None and number > 0:
        if (end := logformat.flush_end(entries, number)) is None:
            flushes = sum(e.is_flush for e in entries)
            raise CrashlabError(f"--to {to}: the log has only {flushes} flush entries")
        return end
    raise CrashlabError(f"--to {to!r}: expected all, entry:K, mark:NAME or flush:N")


@command.command()
@click.argument("log", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--to", "to", default="all", show_default=True,
              help="Where to stop: all, entry:K (first K entries), mark:NAME, flush:N.")
@click.option("--size", type=click.IntRange(0, logformat.MAX_OFFSET), default=None,
              help="Create IMAGE with this many bytes if it does not exist.")
@click.option("--salvage", is_flag=True,
              help="Replay a damaged log up to its last complete entry (exit status 3).")
@sector_size_option
def replay(log: Path, image: Path, to: str, size: int | None, salvage: bool,
           sector_size: str | None) -> None:
    """Apply a log onto IMAGE: writes written, discards punched as holes, marks skipped.

    Exits 1 refusing a damaged log, 2 on bad input (IMAGE untouched), 3 after --salvage used one.
    """
    with _Opened(log, sector_size) as reader:
        try:
            if not salvage:
                reader.require_intact()
            stop = stop_index(reader, to)
        except logformat.InputError as e:
            raise input_error(e) from None
        try:
            if size is not None and not image.exists():
                with image.open("wb") as f:
                    f.truncate(size)
            applied = logformat.replay(reader, image, stop)
        except OSError as e:
            raise CrashlabError(f"{image}: cannot write: {e.strerror or e}") from None
        except logformat.InputError as e:
            raise input_error(e) from None
    click.echo(f"replayed {applied} entries of {log} onto {image}")
    if reader.damage is not None:
        salvaged(log, reader.damage)

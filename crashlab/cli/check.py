"""`crashlab check`: recover crash images and classify each (consistent, data-loss, fs-inconsistent,
unmountable, checker-error)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from crashlab import crashstates, logformat
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.check.tools import DEFAULT_TIMEOUT
from crashlab.cli import CrashlabError, input_error
from crashlab.crashstates import sparse_copy
from crashlab.filesystems import FILESYSTEMS
from crashlab.oracle import Promises, load_promises

EXIT_FAILURE, EXIT_CHECKER_ERROR = 1, 3


def present_seqs(points: Sequence[tuple[int, str]], markers: Sequence[str]) -> frozenset[int] | None:
    """Marker names or seqs, as given on the command line, as the seqs the oracle takes.

    None (every point present: the image is the workload's end state) when none are given.
    """
    wanted = [m.strip() for arg in markers for m in arg.split(",") if m.strip()]
    if not wanted:
        return None
    by_name = {name: seq for seq, name in points}
    seqs = set()
    for m in wanted:
        if m.isdigit():
            seqs.add(int(m))
        elif m in by_name:
            seqs.add(by_name[m])
        else:
            raise CrashlabError(f"--markers: no durability point named {m!r} in the promises file")
    return frozenset(seqs)


def read_promises(promises: Path) -> Promises:
    try:
        return load_promises(promises)
    except (OSError, ValueError, KeyError) as e:
        raise CrashlabError(f"{promises}: cannot read promises: {e}") from None


def state_markers(log: Path, state_ids: Sequence[str]) -> list[frozenset[int]]:
    """The in-band markers present in each crash state of `log`, derived as a campaign derives them
    (crashstates.present_markers): those logged before the state's crash point."""
    try:
        states = [crashstates.parse_id(s) for s in state_ids]
        with logformat.open_log(log) as reader:
            entries = reader.index()
            digest = crashstates.log_digest(reader)[:crashstates.DIGEST_CHARS]
    except logformat.InputError as e:
        raise input_error(e) from None
    present = []
    for st in states:
        if st.digest != digest:
            raise CrashlabError(f"--state-id {st.id}: a state of log {st.digest}, not of {log} ({digest})")
        if st.end > len(entries):
            raise CrashlabError(f"--state-id {st.id}: crash point after entry {st.end}, but {log} has "
                                f"{len(entries)} entries")
        present.append(frozenset(crashstates.present_markers(entries, st.end)))
    return present


def _copy(image: Path, workdir: Path) -> Path:
    dest = workdir / image.name
    sparse_copy(image, dest)  # images are mostly holes
    return dest


@click.command("check")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--fs", "fs", type=click.Choice(list(FILESYSTEMS)), required=True,
              help="Filesystem on the images.")
@click.option("--promises", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The workload's promises.jsonl: run its oracle on each recovered tree.")
@click.option("--markers", multiple=True,
              help="Durability points present in the crash state (names or seqs, comma separated); "
                   "default: all (the image is the end state).")
@click.option("--state-id", "state_ids", multiple=True, help="Crash-state id per image, in order.")
@click.option("--log", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The log the states were built from: each image's durability points present are "
                   "then derived from its --state-id, as a campaign checks it (instead of --markers).")
@click.option("--host-mount", is_flag=True,
              help="Mount on this host with loop devices instead of in a checker guest. A corrupted "
                   "image can crash the kernel that mounts it: disposable machines only.")
@click.option("--ext4-recovery", type=click.Choice(["e2fsck", "mount"]), default="e2fsck", show_default=True,
              help="ext4/ext3 journal replay: userspace `e2fsck -E journal_only`, or a kernel mount.")
@click.option("--in-place", is_flag=True, help="Recover the images themselves (default: sparse copies).")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds each tool or mount may take before it counts as a checker-error.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per image, one per line.")
def command(images: tuple[Path, ...], fs: str, promises: Path | None, markers: tuple[str, ...],
            state_ids: tuple[str, ...], log: Path | None, host_mount: bool, ext4_recovery: str,
            in_place: bool, timeout: float, as_json: bool) -> None:
    """Recover crash IMAGES (journal/log replay) and check them: fsck, then the workload's oracle.

    Exit status: 0 all consistent, 1 some failure (data-loss, fs-inconsistent or unmountable),
    3 some checker-error and no failure, 2 bad input (before any image is touched).
    """
    if state_ids and len(state_ids) != len(images):
        raise CrashlabError(f"--state-id given {len(state_ids)} times for {len(images)} images")
    if log is not None and (promises is None or not state_ids or markers):
        raise CrashlabError("--log derives each image's durability points from its --state-id for "
                            "--promises' oracle: give it with both, and without --markers")
    if markers and promises is None:
        raise CrashlabError("--markers says which durability points of --promises are present: give both")
    loaded = read_promises(promises) if promises else None
    # Per image: the durability points present, None for all of them (the workload's end state).
    present = (state_markers(log, state_ids) if log is not None
               else [present_seqs(loaded.points, markers) if loaded else None] * len(images))
    records: list[CheckRecord] = []
    with contextlib.ExitStack() as stack:
        work = None
        if not in_place:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crashlab-")))
        items = []
        for n, image in enumerate(images):
            path = image
            if work is not None:
                (work / str(n)).mkdir()
                path = _copy(image, work / str(n))
            # Promises and seqs as campaign.run_check passes them, so a checker guest judges its own
            # mount here too; the callable judges a copy when that mount cannot be read in full.
            items.append(CheckItem(path, fs, state_ids[n] if state_ids else str(image),
                                   loaded.oracle(present[n]) if loaded else None,
                                   promises=promises, present=present[n]))
        for rec in check_batch(items, host_mount=host_mount, ext4_recovery=ext4_recovery,  # type: ignore[arg-type]
                               timeout=timeout, mount_timeout=timeout):
            rec.image = str(images[len(records)])
            records.append(rec)
            if as_json:
                click.echo(json.dumps(rec.to_dict(), sort_keys=True))
    if not as_json:
        _table(records)
    outcomes = {r.outcome for r in records}
    if any(o.is_failure for o in outcomes):
        raise SystemExit(EXIT_FAILURE)
    if Outcome.CHECKER_ERROR in outcomes:
        raise SystemExit(EXIT_CHECKER_ERROR)


def _table(records: Sequence[CheckRecord]) -> None:
    style = {Outcome.CONSISTENT: "green", Outcome.CHECKER_ERROR: "yellow"}
    t = Table("state", "outcome", "reason", "seconds")
    for r in records:
        t.add_row(r.state_id, f"[{style.get(r.outcome, 'red')}]{r.outcome}[/]", r.reason,
                  f"{r.timings.get('total', 0):.2f}")
    Console().print(t)
    for r in records:
        for v in r.violations[:10]:
            click.echo(f"{r.state_id}: {v}")

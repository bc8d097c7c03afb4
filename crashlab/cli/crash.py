"""`crashlab crash`: generate crash states from a recorded log, rebuild one from its id, and check
a log's states the way replay-log users do."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from crashlab import cluster, crashstates, logcheck, logformat, model
from crashlab.cachemodes import CACHE_MODES, UnknownCacheMode
from crashlab.check.outcome import Outcome
from crashlab.check.runner import CHECKERS
from crashlab.cli import CrashlabError, input_error, salvaged
from crashlab.filesystems import FILESYSTEMS

EXIT_FAILED = 1  # some state is corrupt or lost fsynced data (a check-cmd said no)
EXIT_UNCHECKED = 4  # no state failed, but some could not be checked (as matrix and run)


def _recorded(log: Path) -> tuple[str, str] | None:
    """What the run.json beside LOG (the recording's directory) says it was recorded with."""
    path = log.parent / "run.json"
    if not path.is_file():
        return None
    try:
        return model.recorded(json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnknownCacheMode are ValueErrors
        raise CrashlabError(f"{path}: not a usable run.json: {e}") from None


@click.group("crash")
def command() -> None:
    """Crash states: the disk images a host power loss could leave, from a recorded log."""


@command.command("generate")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--cache", "cache", default=None, metavar="MODE",
              help=f"QEMU cache mode the log was recorded under: {', '.join(CACHE_MODES)} "
              "(default: the recording's run.json; a qemu log's mode cannot be contradicted).")
@click.option("--what-if-cache", "what_if", default=None, metavar="MODE",
              help="Read the log under this mode instead of the recorded one: a counterfactual.")
@click.option("--recorder", type=click.Choice(model.READABLE), default=None,
              help="Who recorded the log: QEMU blklogwrites (qemu), dm-log-writes in the guest (dm) or "
              "on the host (host-dm) (default: the recording's run.json).")
@click.option("--count", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--window", default=None, metavar="S|inf",
              help="Volatility window in seconds (default: the cache mode's).")
@click.option("--baseline", default=model.DEFAULT_BASELINE, show_default=True, metavar="NAME|none",
              help="Mark or marker before which everything is settled.")
@click.option("--torn", type=click.Choice(["512", "4096"]), default=None,
              help="Atomic unit for torn writes (not below the log's sector size).")
@click.option("--strategy", type=click.Choice(crashstates.STRATEGIES), default="random", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also build every state's image as OUT/ID.img.")
@click.option("--salvage", is_flag=True,
              help="Use a damaged log's complete entries instead of refusing it (exit status 3).")
def generate(log: Path, cache: str | None, what_if: str | None, recorder: str | None, count: int, seed: int,
             window: str | None, baseline: str, torn: str | None, strategy: str, out: Path | None,
             salvage: bool) -> None:
    """Print COUNT crash-state ids for LOG, then a summary. Recorder and cache mode come from
    the run.json beside LOG when there is one.

    Exits 1 refusing a damaged log, 2 on bad input (nothing written), 3 after --salvage used one.
    """
    try:
        how = model.reading(_recorded(log), recorder, cache, what_if)
        cfg = model.config(how.recorder, how.cache, window, None if baseline == "none" else baseline,
                           int(torn) if torn else None)
    except (UnknownCacheMode, model.ModelError) as e:
        raise CrashlabError(f"{log}: {e}") from None
    try:
        with logformat.open_log(log) as reader:
            if not salvage:
                reader.require_intact()
            digest = crashstates.log_digest(reader)
            m = model.LogModel(reader.index(), cfg)
            camp = crashstates.generate(m, digest, count, seed, strategy)
            for st in camp.states:
                click.echo(st.id)
            built = ""
            if out is not None:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise CrashlabError(f"{out}: cannot make the directory: {e.strerror}") from None
                t0 = time.monotonic()
                with crashstates.Materializer(reader, m, digest) as mat:
                    for st in camp.states:
                        mat.build(st, out / f"{st.id}.img")
                dt = time.monotonic() - t0
                built = f"built {len(camp.states)} images in {out} in {dt:.2f} s"
    except model.ModelError as e:
        raise CrashlabError(f"{log}: {e}") from None
    except logformat.InputError as e:
        raise input_error(e) from None
    summary = {"reading": how.describe(), **camp.summary(m)}
    click.echo(f"# {log.name} sha256 {digest[:crashstates.DIGEST_CHARS]} recorder {cfg.recorder} "
               f"cache {cfg.cache.name} strategy {strategy} seed {seed}"
               + (f" torn {cfg.torn}" if cfg.torn else ""), err=True)
    for k, v in summary.items():
        click.echo(f"#   {k}: {v}", err=True)
    if built:
        click.echo(f"# {built}", err=True)
    if reader.damage is not None:
        salvaged(log, reader.damage)


@command.command("build")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("state_id", metavar="ID")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", type=click.IntRange(1, logformat.MAX_OFFSET), default=None,
              help="Image size in bytes (default: the furthest offset the log touches).")
@click.option("--salvage", is_flag=True,
              help="Use a damaged log's complete entries instead of refusing it (exit status 3).")
def build(log: Path, state_id: str, image: Path, size: int | None, salvage: bool) -> None:
    """Rebuild the image of crash state ID from LOG into IMAGE.

    Exits 1 refusing a damaged log, 2 on bad input (IMAGE untouched), 3 after --salvage used one.
    """
    try:
        cfg = crashstates.parse_id(state_id).cfg
        # The id names its mode outright, so a qemu log may be read under another: say which.
        how = model.reading(_recorded(log), cfg.recorder, what_if=cfg.cache.name)
        r, damage = crashstates.build_one(log, state_id, image, size, salvage)
    except model.ModelError as e:
        raise CrashlabError(str(e)) from None
    except logformat.InputError as e:
        raise input_error(e) from None
    click.echo(f"{image}: crash after {r.cp.end} entries, base at op {r.cp.stable}, "
               f"{len(r.chosen)}/{len(r.cp.volatile)} volatile ops persisted"
               + (f", {len(r.tears)} torn" if r.tears else "") + f"; reading {how.describe()}")
    if damage is not None:
        salvaged(log, damage)


@command.command("check")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fs", type=click.Choice(list(FILESYSTEMS)), default="ext4", show_default=True)
@click.option("--recorder", type=click.Choice(model.READABLE), default=None,
              help="Who recorded the log (default: the recording's run.json; else required).")
@click.option("--cache", "cache", default=None, metavar="MODE",
              help="Cache mode the log was recorded under (default: the recording's run.json; else "
              "required).")
@click.option("--promises", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The workload's promises.jsonl: run its fsync oracle on every state too.")
@click.option("--strategy", type=click.Choice(crashstates.STRATEGIES), default="prefix-fua",
              show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="At most this many states [default: all the strategy yields; 1000 for random ones].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--window", default=None, metavar="S|inf", help="Volatility window (default: the mode's).")
@click.option("--torn", type=click.Choice(["512", "4096"]), default=None)
@click.option("--baseline", default="none", show_default=True, metavar="NAME|none",
              help="Mark or marker before which everything is settled (a foreign log has none).")
@click.option("--check-cmd", default=None, metavar="'CMD {image}'",
              help="Judge each state with this command instead (exit 0 = consistent), as replay-log "
              "--fsck does.")
@click.option("--read-only", is_flag=True,
              help="The --check-cmd never writes the image: check each state in place, no copy.")
@click.option("--no-same-reads", "same_reads", flag_value=False, default=True,
              help="Run the --check-cmd on every state, even one whose bytes at every offset the "
              "command read for an earlier state are the same (by default that state gets the earlier "
              "verdict: the command's reads are traced).")
@click.option("--checker", type=click.Choice(CHECKERS), default="auto", show_default=True,
              help="Where the built-in checks mount: auto = ext4 in userspace, XFS/btrfs in a guest.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Workers [default: every core].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def check(log: Path, fs: str, recorder: str | None, cache: str | None, promises: Path | None, strategy: str,
          count: int | None, seed: int, window: str | None, torn: str | None, baseline: str,
          check_cmd: str | None, read_only: bool, same_reads: bool, checker: str, jobs: int | None,
          as_json: bool) -> None:
    """Check LOG's crash states and print the outcome counts.

    Exits 0 when every state is consistent, 1 when some are not, 4 when none failed but some could
    not be checked, 2 on bad input.
    """
    argv: tuple[str, ...] = ()
    if check_cmd is not None:
        argv = tuple(shlex.split(check_cmd))
        if not argv or not any("{image}" in a for a in argv):
            raise click.UsageError("--check-cmd must name the image as {image}, e.g. 'e2fsck -fn {image}'")
    elif read_only:
        raise click.UsageError("--read-only is about --check-cmd")
    elif not same_reads:
        raise click.UsageError("--no-same-reads is about --check-cmd")
    recorded = _recorded(log)
    if recorded is None and (recorder is None or cache is None):
        raise click.UsageError(f"{log}: no run.json beside it: give --recorder and --cache")
    try:
        how = model.reading(recorded, recorder, cache)
        cfg = model.config(how.recorder, how.cache, window, None if baseline == "none" else baseline,
                           int(torn) if torn else None)
    except (UnknownCacheMode, model.ModelError) as e:
        raise CrashlabError(f"{log}: {e}") from None
    if count is None:
        count = 1000 if strategy in ("random", "epochs", "writeback-order", "prefix") else 1 << 30
    job = logcheck.LogCheck(log, cfg, fs, strategy, count, seed, promises, argv, read_only, checker,
                            same_reads=same_reads)

    def progress(s: logcheck.Summary, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            bad = sum(v for k, v in s.counts.items() if k != Outcome.CONSISTENT.value)
            click.echo(f"\r{s.states}/{total} states, {bad} not consistent", nl=False, err=True)
    try:
        summary = logcheck.check_log(job, jobs, progress)
    except model.ModelError as e:
        raise CrashlabError(f"{log}: {e}") from None
    except logformat.InputError as e:
        raise input_error(e) from None
    except cluster.ClusterError as e:
        raise CrashlabError(str(e)) from None
    if not as_json and sys.stderr.isatty():
        click.echo("", err=True)
    if as_json:
        click.echo(json.dumps({"log": str(log), "reading": how.describe(), "strategy": strategy,
                               "judge": shlex.join(argv) if argv else f"crashlab ({checker})",
                               **summary.to_dict()}, indent=1))
    else:
        click.echo(f"{log.name}: {summary.states} states ({strategy}, reading {how.describe()}), "
                   f"judged by {shlex.join(argv) if argv else f'crashlab checks ({checker})'}, "
                   f"{summary.jobs} workers, {summary.seconds:.1f} s ({summary.rate:.1f} states/s)")
        for name, n in sorted(summary.counts.items()):
            click.echo(f"  {name:16} {n}")
        if summary.same_reads:
            click.echo(f"  ({summary.same_reads} of them given an earlier state's verdict: the command "
                       "read the same bytes of both; --no-same-reads runs it on each)")
        if summary.untraced:
            click.echo(f"  (the command ran on every state: its reads cannot be traced here: "
                       f"{summary.untraced})")
        for v in summary.failed[:20]:
            click.echo(f"  {v.outcome.value}: {v.state_id}: {v.reason}")
        if len(summary.failed) > 20:
            click.echo(f"  ... and {len(summary.failed) - 20} more (--json lists all)")
    if any(v.outcome.is_failure for v in summary.failed):
        raise SystemExit(EXIT_FAILED)
    if summary.counts.get(Outcome.CHECKER_ERROR.value):
        raise SystemExit(EXIT_UNCHECKED)

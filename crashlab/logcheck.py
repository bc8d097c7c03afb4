"""Check the crash states of any log, the way xfstests' replay-log users do, on every core.

    summary = check_log(LogCheck(log, cfg, fs="ext4", strategy="prefix-fua",
                                 check_cmd=("e2fsck", "-fn", "{image}")), jobs=2)

A log recorded by anyone (an xfstests dm-log-writes test, a user's own setup) is read with the
durability model `cfg`; its states (crashstates.generate) are split into contiguous slices in
`stable` order, one `Materializer` per worker, so each worker replays the log once. Each state is
then judged either by crashlab's own checks (recovery, fsck and, with a promises file, the fsync
oracle: crashlab.check) or by the user's command (`{image}` is the image; exit 0 = consistent), as
`replay-log --fsck` does. A command that only reads the image (`read_only`) gets the state checked
out in place in the worker's base image, no copy at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from crashlab import cluster, crashstates, logformat, model, readtrace
from crashlab.check import inplace
from crashlab.check.outcome import Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.check.tools import run_tool
from crashlab.filesystems import USERSPACE_READABLE
from crashlab.oracle import load_promises

CHECK_CMD_TIMEOUT = 300.0
SLICES_PER_JOB = 4  # smaller slices balance the workers; each costs one base replay
MIN_SLICE = 250  # states: a short check is cut once per worker, not finer (one replay each)


class LogCheckError(logformat.InputError):
    """Bad input to a log check, in one line."""


@dataclass(frozen=True)
class LogCheck:
    """What to check: everything a worker needs, picklable."""

    log: Path
    cfg: model.Config
    fs: str = "ext4"
    strategy: str = "prefix-fua"
    count: int = 1 << 30
    seed: int = 0
    promises: Path | None = None
    check_cmd: tuple[str, ...] = ()  # argv; `{image}` is the image
    read_only: bool = False  # the command never writes the image: no per-state copy
    checker: str = "auto"
    size: int | None = None
    same_reads: bool = True  # a state the command would read the same bytes of reuses a verdict


@dataclass
class StateVerdict:
    state_id: str
    outcome: Outcome
    reason: str
    same_as: str = ""  # the state whose verdict this is: the command read the same bytes of both


@dataclass
class Summary:
    states: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    failed: list[StateVerdict] = field(default_factory=list)  # not consistent, in log order
    seconds: float = 0.0
    duplicates: int = 0
    jobs: int = 1
    same_reads: int = 0  # states given an earlier state's verdict (readtrace)
    untraced: str = ""  # why reads could not be traced, if they could not

    @property
    def rate(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"states": self.states, "outcomes": dict(sorted(self.counts.items())),
                "seconds": round(self.seconds, 3), "states_per_s": round(self.rate, 1), "jobs": self.jobs,
                "duplicates_dropped": self.duplicates, "same_reads": self.same_reads,
                **({"untraced": self.untraced} if self.untraced else {}),
                "failed": [{"state_id": v.state_id, "outcome": v.outcome.value, "reason": v.reason,
                            **({"same_reads_as": v.same_as} if v.same_as else {})} for v in self.failed]}


def plan(job: LogCheck) -> tuple[list[str], int]:
    """The state ids to check, in `stable` order, and how many duplicates generation dropped."""
    with logformat.open_log(job.log) as reader:
        reader.require_intact()
        m = model.LogModel(reader.index(), job.cfg)
        camp = crashstates.generate(m, crashstates.log_digest(reader), job.count, job.seed, job.strategy)
    return [s.id for s in camp.states], camp.duplicates


def command_verdict(argv: Sequence[str], image: Path, timeout: float = CHECK_CMD_TIMEOUT,
                    env: Mapping[str, str] | None = None) -> tuple[Outcome, str]:
    """The user's command on one image: exit 0 consistent, another exit inconsistent; a command
    that hangs, is missing or is killed says nothing about the image (a checker error)."""
    run = run_tool([a.replace("{image}", str(image)) for a in argv], timeout, env=env)
    if run.missing or run.timed_out or run.rc is None or run.rc < 0:
        why = run.error or ("timed out" if run.timed_out else f"killed by signal {-(run.rc or 0)}")
        return Outcome.CHECKER_ERROR, f"{argv[0]}: {why}"
    if run.rc == 0:
        return Outcome.CONSISTENT, f"{argv[0]} exit 0"
    # The image's path is a scratch file's: named as the command line names it, the reason is the
    # same from run to run (and for a state given this verdict for reading the same bytes).
    first = (run.stdout + run.stderr).replace(str(image), "{image}").strip().splitlines()[-1:] or [""]
    return Outcome.FS_INCONSISTENT, f"{argv[0]} exit {run.rc}: {first[0][:200]}"


def _remembered(memo: readtrace.SameReads[tuple[Outcome, str]] | None, st: crashstates.CrashState,
                image: Path) -> StateVerdict | None:
    """The verdict of an earlier state that read the same bytes as `image` holds, if any."""
    if memo is None or (hit := memo.lookup(image)) is None:
        return None
    (outcome, why), same = hit
    return StateVerdict(st.id, outcome, why, same_as=same)


def _judge(job: LogCheck, st: crashstates.CrashState, image: Path, memo: readtrace.SameReads[
        tuple[Outcome, str]] | None, workdir: str) -> StateVerdict:
    """The command's verdict on one state's image, its reads traced when `memo` keeps them."""
    if memo is None:
        return StateVerdict(st.id, *command_verdict(job.check_cmd, image))
    with readtrace.tracing(image, workdir) as (env, log):
        outcome, why = command_verdict(job.check_cmd, image, env=env)
        if outcome is not Outcome.CHECKER_ERROR:  # a hang or a kill says nothing to reuse
            memo.add(image, readtrace.read_log(log), (outcome, why), st.id)
    return StateVerdict(st.id, outcome, why)


def check_slice(job: LogCheck, ids: Sequence[str], stop: threading.Event | None = None
                ) -> list[StateVerdict]:
    """One worker's share: build (or check out) each state and judge it; a thread stops at the
    next state once `stop` is set (an interrupt), its share then incomplete and unused."""
    states = [crashstates.parse_id(s) for s in ids]
    out: list[StateVerdict] = []
    workdir = crashstates.default_workdir()
    with logformat.open_log(job.log) as reader, \
            tempfile.TemporaryDirectory(prefix="crashlab-logcheck-", dir=workdir) as tmp:
        entries = reader.index()
        m = model.LogModel(entries, job.cfg)
        digest = crashstates.log_digest(reader)
        def materializer() -> crashstates.Materializer:
            return crashstates.Materializer(reader, m, digest, size=job.size)

        def stopped() -> bool:
            return stop is not None and stop.is_set()

        if job.check_cmd:
            memo = readtrace.SameReads[tuple[Outcome, str]]() if traced(job) else None
            with materializer() as mat:
                for st in states:
                    if stopped():
                        break
                    verdict = None
                    # Checked out in place to be compared, even when the command gets a copy; a
                    # state too large to check out is compared on its copy.
                    compared = (memo is not None or job.read_only) and mat.checkout_fits(st)
                    if compared:
                        with mat.checkout(st) as image:
                            verdict = _remembered(memo, st, image)
                            if verdict is None and job.read_only:
                                verdict = _judge(job, st, image, memo, tmp)
                    if verdict is None:
                        copy = Path(tmp) / "state.img"
                        mat.build(st, copy)
                        verdict = (None if compared else _remembered(memo, st, copy)) or \
                            _judge(job, st, copy, memo, tmp)
                        copy.unlink()
                    out.append(verdict)
            return out
        promises = load_promises(job.promises) if job.promises else None

        def item(st: crashstates.CrashState, image: Path, undo: Path | None = None) -> CheckItem:
            if promises is None:
                return CheckItem(image, job.fs, st.id, undo=undo)
            present = frozenset(crashstates.present_markers(entries, st.end))
            return CheckItem(image, job.fs, st.id, promises.oracle(present), promises=job.promises,
                             present=present, undo=undo)

        if inplace.applies(job.fs, job.checker):
            judged = inplace.check_in_place(job.fs, states, materializer, item, Path(tmp))
            with contextlib.closing(judged) as recs:
                for rec in recs:
                    out.append(StateVerdict(rec.state_id, rec.outcome, rec.reason))
                    if stopped():
                        break
            return out
        items = []
        with materializer() as mat:
            for st in states:
                if stopped():
                    break
                image = Path(tmp) / f"{st.id}.img"
                mat.build(st, image)
                items.append(item(st, image))
        for rec in check_batch(items, checker=job.checker):
            out.append(StateVerdict(rec.state_id, rec.outcome, rec.reason))
            Path(rec.image).unlink(missing_ok=True)
    return out


def traced(job: LogCheck) -> bool:
    """Whether the command's reads are traced, so verdicts can be reused (readtrace)."""
    return bool(job.check_cmd) and job.same_reads and readtrace.library() is not None


def slice_resources(job: LogCheck) -> dict[str, float]:
    """A slice boots a checker guest unless its states are judged by a command or in userspace."""
    if job.check_cmd or job.checker in ("userspace", "host") or (
            job.checker == "auto" and job.fs in USERSPACE_READABLE):
        return {}
    return {"qemu": 1}


def check_log(job: LogCheck, jobs: int | None = None,
              on_progress: Callable[[Summary, int], None] = lambda s, total: None) -> Summary:
    """Check every planned state of `job` on `jobs` workers (default: every core)."""
    t0 = time.monotonic()
    with _inflated(job) as plain:
        return _check_log(plain, jobs, on_progress, t0)


@contextlib.contextmanager
def _inflated(job: LogCheck) -> Iterator[LogCheck]:
    """The job on the log decompressed once, if it is an .xz: the plan and every slice open it,
    and inflating it for each was a tenth of a 500-state check."""
    if job.log.suffix != ".xz":
        yield job
        return
    with logformat.open_log(job.log) as reader:
        yield replace(job, log=reader.path)


def _check_log(job: LogCheck, jobs: int | None, on_progress: Callable[[Summary, int], None],
               t0: float) -> Summary:
    ids, dupes = plan(job)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(ids) or 1))
    summary = Summary(duplicates=dupes, jobs=jobs)
    if job.check_cmd and job.same_reads and not traced(job):  # built here once, not in each thread
        summary.untraced = readtrace.unavailable()
    cuts = max(jobs, min(jobs * SLICES_PER_JOB, len(ids) // MIN_SLICE))
    n = max(1, -(-len(ids) // cuts))
    slices = [ids[k:k + n] for k in range(0, len(ids), n)]
    order = {sid: k for k, sid in enumerate(ids)}
    results: list[StateVerdict] = []
    if jobs == 1:
        for sl in slices:
            results += _tally(summary, check_slice(job, sl))
            on_progress(summary, len(ids))
    elif not slice_resources(job):
        # Every slice only spawns tools (a command, e2fsck, debugfs) and writes images, all of which
        # release the GIL: threads use every core without the 2 s a Dask cluster takes to start,
        # which is longer than a whole prefix-fua check of a small log.
        stop = threading.Event()
        with ThreadPoolExecutor(jobs, thread_name_prefix="logcheck") as pool:
            futs = [pool.submit(check_slice, job, sl, stop) for sl in slices]
            try:
                for tf in as_completed(futs):
                    results += _tally(summary, tf.result())
                    on_progress(summary, len(ids))
            except BaseException:
                stop.set()
                for tf in futs:
                    tf.cancel()
                raise
    else:
        # A checker guest per worker: the campaigns' executor, a local Dask cluster torn down on
        # the way out (an interrupt too).
        with cluster.connect(None, jobs) as on:
            futures = [on.submit(check_slice, job, sl, resources=slice_resources(job)) for sl in slices]
            for fut in on.as_completed(futures):
                results += _tally(summary, fut.result())
                on_progress(summary, len(ids))
    summary.failed = sorted((v for v in results if v.outcome is not Outcome.CONSISTENT),
                            key=lambda v: order[v.state_id])
    summary.seconds = time.monotonic() - t0
    return summary


def _tally(summary: Summary, verdicts: list[StateVerdict]) -> list[StateVerdict]:
    summary.states += len(verdicts)
    summary.same_reads += sum(bool(v.same_as) for v in verdicts)
    summary.counts.update(v.outcome.value for v in verdicts)
    return verdicts

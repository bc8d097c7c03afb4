"""Campaigns: a matrix of cells, each recorded once and checked at many crash states.

A cell is one configuration (filesystem, cache mode, barrier, recorder, workload, window, ...). Work
comes in two independent, serialisable units: `RecordUnit` (boot a guest, record the cell's log)
and `CheckUnit` (build a batch of crash-state images from that log and check them in one checker
guest boot). A process pool runs them; the parent owns the store and writes each unit's outcomes
the moment it returns, so an interrupted campaign loses only the units in flight and a rerun of the
same command skips every state already stored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import crashlab
from crashlab import cluster, crashstates, logformat, model, nbd, recorders, rundir, signals
from crashlab.cachemodes import CACHE_MODES, CacheMode, cache_mode
from crashlab.check import inplace
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.check.tools import tool_versions
from crashlab.diskmodels import AIO_MODES, DEFAULT_AIO, DEFAULT_DISK, DETECT_ZEROES, DISCARD
from crashlab.filesystems import FILESYSTEMS, USERSPACE_READABLE
from crashlab.guest.machine import find_qemu
from crashlab.guest.provision import ProvisionError, file_identity
from crashlab.oracle import load_promises
from crashlab.record import OPTIONAL_FIELDS, GuestOutputs, RecordConfig, record_cells, tool_version
from crashlab.record import series as record_series
from crashlab.recorders import Recorder
from crashlab.store import Store
from crashlab.workload import available

STATES_PER_UNIT = 50  # states a worker builds and checks at a time: bounds what an interrupt can lose
# A cell's states take seconds each to check under TCG: a million is weeks, and more is a typo that
# would otherwise spin in state generation before saying anything.
MAX_STATES = 1_000_000
# Each worker boots a guest of its own: past a few per core they only compete for memory, and a
# typo such as -j 10000 would fork that many processes.
MAX_WORKERS = max(64, 4 * (os.cpu_count() or 1))
DEFAULT_WORKLOADS = ("smallfiles", "nofsync")


class CampaignError(ValueError):
    """A matrix or cell the user got wrong; one line saying what is valid."""


BARRIER = {"on": True, "off": False}  # barrier as stored and typed


def barrier_name(barrier: bool) -> str:
    return "on" if barrier else "off"


def parse_barrier(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return BARRIER[value.strip().lower()]
    except KeyError:
        raise CampaignError(f"barrier must be on or off, not {value!r}") from None


# Cell fields added after the store existed, with their defaults: left out of keys, slugs and
# store rows at those defaults, so every earlier cell keeps them byte for byte.
CELL_OPTIONAL = OPTIONAL_FIELDS


def file_digest(path: str) -> str:
    """sha256 of a file's content, first 16 hex digits; "missing" when it cannot be read (the
    cell's validation says why)."""
    try:
        return _digest(json.dumps(file_identity(Path(path).resolve()), sort_keys=True))
    except OSError:
        return "missing"


@functools.cache
def _digest(identity: str) -> str:
    # Keyed by path, size and mtime: a 10 MB kernel is hashed once per process, not per key.
    h = hashlib.sha256()
    with open(json.loads(identity)["path"], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One configuration, typed; `parse` makes one from names (a store row, TOML, a command line)."""

    fs: str = "ext4"
    cache: CacheMode = CACHE_MODES["writeback"]
    barrier: bool = True
    recorder: Recorder = Recorder.QEMU
    workload: str = "smallfiles"
    window: str = "default"  # seconds, "inf", or "default" (the cache mode's, DESIGN.md)
    torn: int = 0  # atomic unit for torn writes, 0 = none
    data_mode: str = "ordered"
    seed: int = 1
    scale: int = 1
    strategy: str = "random"
    storage: str = "local"  # crashlab.nbd.STORAGES: a local file, or an NBD export logged on its server
    # The data disk (crashlab.diskmodels) and what the user ships: their kernel (an image and its
    # lib/modules/VERSION) and QEMU binary; "" = crashlab's Debian kernel, the QEMU on PATH.
    disk: str = DEFAULT_DISK
    aio: str = DEFAULT_AIO
    discard: str = DISCARD[0]
    detect_zeroes: str = DETECT_ZEROES[0]
    kernel: str = ""
    modules: str = ""
    qemu: str = ""

    OPTIONAL: ClassVar[Mapping[str, str]] = CELL_OPTIONAL
    # A path names a file, not what it holds: a rebuilt kernel or QEMU at the same path is another
    # cell, so the key carries the content digest beside the path.
    DIGESTED = ("kernel", "qemu")

    def stored(self) -> dict[str, Any]:
        """The fields as the store, keys and slugs have always spelled them: names for the cache mode
        and the recorder, on/off for the barrier; the optional fields only when set, a user's
        kernel and QEMU with their content digests."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if self.OPTIONAL.get(f.name, object()) != getattr(self, f.name)}
        for name in self.DIGESTED:
            if name in d:
                d[f"{name}_sha256"] = file_digest(self.qemu_binary if name == "qemu" else self.kernel)
        return {**d, "cache": self.cache.name, "barrier": barrier_name(self.barrier),
                "recorder": self.recorder.value}

    @property
    def qemu_binary(self) -> str:
        """The QEMU this cell boots, resolved as the guest layer resolves it (a name on PATH too)."""
        try:
            return find_qemu(self.qemu or None)
        except ProvisionError as e:
            raise CampaignError(f"--qemu {self.qemu}: {e}") from None

    @classmethod
    def parse(cls, values: Mapping[str, Any], base: Cell | None = None) -> Cell:
        """`base` (default: the default cell) with `values`, where the cache mode, barrier and
        recorder may be given by name; a bad name or field raises CampaignError saying what is valid."""
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - names):
            raise CampaignError(f"unknown cell fields {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(names))}")
        v = dict(values)
        try:
            if isinstance(v.get("cache"), str):
                v["cache"] = cache_mode(v["cache"])
            if "recorder" in v:
                v["recorder"] = recorders.recorder(v["recorder"])
            if "storage" in v:
                v["storage"] = nbd.storage(v["storage"])
        except ValueError as e:
            raise CampaignError(str(e)) from None
        if "barrier" in v:
            v["barrier"] = parse_barrier(v["barrier"])
        return replace(base or cls(), **v)

    @property
    def key(self) -> str:
        """Canonical and stable: the store's name for this cell."""
        return " ".join(f"{k}={v}" for k, v in self.stored().items())

    RECORDED = ("fs", "cache", "barrier", "recorder", "workload", "data_mode", "seed", "scale")

    @property
    def recording_slug(self) -> str:
        """Names the recording: only what the guest run depends on, so cells that differ in the
        crash model alone (window, torn writes, strategy) share one log."""
        stored = self.stored()
        recorded = " ".join(f"{k}={stored[k]}" for k in self.RECORDED)
        recorded += "".join(f" {k}={v}" for k, v in stored.items()
                            if k in self.OPTIONAL or k.endswith("_sha256"))
        return hashlib.sha256(recorded.encode()).hexdigest()[:16]

    def config(self) -> dict[str, Any]:
        """For the store and reports: the fields, with the window as it applies ('30s') and as
        written ('default'), so a report names the window and a cell can be rebuilt from a row,
        and the seed its crash states are drawn with (derived: `sampling_seed`)."""
        return {**self.stored(), "window": self.window_label, "window_spec": self.window,
                "sampling_seed": sampling_seed(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Cell:
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        return cls.parse({**values, "window": config.get("window_spec", values.get("window", "default"))})

    @property
    def window_label(self) -> str:
        if self.window != "default":
            return self.window if self.window == "inf" else f"{float(self.window):g}s"
        return f"{self.cache.default_window_s:g}s"

    @property
    def label(self) -> str:
        """Short, for a progress line: what differs between the cells of a typical matrix."""
        extra = [f"window={self.window_label}" if self.window != "default" else "",
                 f"torn={self.torn}" if self.torn else "",
                 f"recorder={self.recorder.value}" if self.recorder is not Recorder.QEMU else "",
                 f"strategy={self.strategy}" if self.strategy != "random" else "",
                 *(f"{k}={getattr(self, k)}" for k in ("storage", "disk", "aio", "discard", "detect_zeroes")
                   if getattr(self, k) != self.OPTIONAL[k]),
                 f"kernel={Path(self.kernel).name}" if self.kernel else "",
                 f"qemu={Path(self.qemu).name}" if self.qemu else ""]
        return " ".join([self.fs, f"cache={self.cache.name}", f"barrier={barrier_name(self.barrier)}",
                         self.workload, *filter(None, extra)])

    def model_config(self) -> model.Config:
        return model.config(self.recorder, self.cache, None if self.window == "default" else self.window,
                            torn=self.torn or None)

    def record_config(self) -> Any:

        return RecordConfig(fs=self.fs, cache=self.cache, barrier=self.barrier,
                            data_mode=self.data_mode, recorder=self.recorder, workload=self.workload,
                            seed=self.seed, scale=self.scale, storage=self.storage, disk=self.disk,
                            aio=self.aio, discard=self.discard, detect_zeroes=self.detect_zeroes,
                            kernel=self.kernel, modules=self.modules, qemu=self.qemu)

    def validate(self) -> Cell:
        try:
            self.record_config().validate()
            self.model_config()
        except ValueError as e:
            raise CampaignError(f"cell {self.key}: {e}") from None
        if self.kernel and not Path(self.kernel).is_file():
            raise CampaignError(f"--kernel {self.kernel}: no such kernel image")
        if self.modules and not (Path(self.modules) / "modules.dep").is_file():
            raise CampaignError(f"--modules {self.modules}: no modules.dep (run depmod, or point at "
                                "lib/modules/VERSION)")
        if self.qemu:
            self.qemu_binary  # noqa: B018 (the lookup is the check)
        if self.strategy not in crashstates.STRATEGIES:
            raise CampaignError(f"unknown strategy {self.strategy!r}; "
                                f"valid: {', '.join(crashstates.STRATEGIES)}")

        if self.workload not in available():
            raise CampaignError(f"unknown workload {self.workload!r}; available: {', '.join(available())}")
        return self


@dataclass(frozen=True)
class Matrix:
    """The cross product of the listed values, minus what cannot exist (XFS without barriers)."""

    fs: tuple[str, ...] = ("ext4",)
    cache: tuple[str, ...] = tuple(CACHE_MODES)
    barrier: tuple[str, ...] = ("on", "off")
    recorder: tuple[str, ...] = ("qemu",)
    workload: tuple[str, ...] = DEFAULT_WORKLOADS
    window: tuple[str, ...] = ("default",)
    torn: tuple[int, ...] = (0,)
    states: int = 100
    seed: int = 1
    scale: int = 1
    strategy: str = "random"
    storage: tuple[str, ...] = (CELL_OPTIONAL["storage"],)
    disk: tuple[str, ...] = (DEFAULT_DISK,)
    aio: tuple[str, ...] = (DEFAULT_AIO,)
    discard: str = DISCARD[0]
    detect_zeroes: str = DETECT_ZEROES[0]
    kernel: str = ""
    modules: str = ""
    qemu: str = ""
    # Where the matrix runs, not what it is: never part of `command()` or a cell.
    scheduler: str = ""  # tcp://HOST:PORT of a Dask scheduler; "" = a cluster on this machine
    shared_recordings: str = ""  # a directory every worker sees at the same path; "" = ship them

    def cells(self) -> list[Cell]:
        """The matrix's cells, its names parsed (CampaignError says what is valid)."""
        out = []
        skipped = ""
        for fs in self.fs:
            for barrier in map(parse_barrier, self.barrier):
                known = FILESYSTEMS.get(fs)  # an unknown one is reported by Cell.validate
                if known is not None and not barrier and known.barrier_off is None:
                    skipped = skipped or f"{fs} has no barrier=off: {known.no_barrier_off}"
                    continue  # there is no such configuration (XFS removed nobarrier in 4.19)
                for cache in self.cache:
                    for aio in self.aio:
                        mode, engine = CACHE_MODES.get(cache), AIO_MODES.get(aio)
                        if mode and engine and engine.needs_direct and not mode.direct:
                            # QEMU refuses aio=native without O_DIRECT: no such configuration.
                            skipped = skipped or f"aio={aio} needs host O_DIRECT (cache=none or directsync)"
                            continue
                        for disk in self.disk:
                            out += self._cells(fs, barrier, cache, disk, aio)
        if not out:
            raise CampaignError(f"the matrix is empty{f': {skipped}' if skipped else ''}")
        return out

    def _cells(self, fs: str, barrier: bool, cache: str, disk: str, aio: str) -> list[Cell]:
        drive = {k: getattr(self, k) for k in ("discard", "detect_zeroes", "kernel", "modules", "qemu")}
        return [Cell.parse(dict(fs=fs, cache=cache, barrier=barrier, recorder=rec, workload=wl, window=window,
                                torn=torn, seed=self.seed, scale=self.scale, strategy=self.strategy,
                                storage=where, disk=disk, aio=aio, **drive)).validate()
                for rec in self.recorder for wl in self.workload for window in self.window
                for torn in self.torn for where in self.storage]

    def command(self) -> str:
        """The `crashlab matrix` command that runs exactly this matrix, every default spelled out, so
        a report's reader can rerun it whatever later versions choose as defaults (the storage and
        disk options, added later, only when set, so earlier runs' commands read as they always did)."""
        lists = ("fs", "cache", "barrier", "recorder", "workload", "window", "torn")
        args = [f"--{k} {','.join(str(v) for v in getattr(self, k))}" for k in lists]
        args += [f"--{k} {getattr(self, k)}" for k in ("states", "seed", "scale", "strategy")]
        args += [f"--{k} {','.join(getattr(self, k))}" for k in ("storage", "disk", "aio")
                 if getattr(self, k) != (CELL_OPTIONAL[k],)]
        args += [f"--{k.replace('_', '-')} {shlex.quote(getattr(self, k))}"
                 for k in ("discard", "detect_zeroes", "kernel", "modules", "qemu")
                 if getattr(self, k) != CELL_OPTIONAL[k]]
        return "crashlab matrix " + " ".join(args)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> Matrix:
        """The one matrix a TOML file describes (see `load_matrices`); a file of several is refused."""
        blocks = load_matrices(path, **overrides)
        if len(blocks) > 1:
            raise CampaignError(f"{path}: holds {len(blocks)} [[matrix]] blocks where one was expected")
        return blocks[0]


def load_matrices(path: Path, **overrides: Any) -> list[Matrix]:
    """The matrices a TOML file describes, every key and value checked (MATRIX_KEYS) before anything
    runs: keys as the options of `crashlab matrix`, at the top level or in [matrix], or several
    cross products as [[matrix]] tables, the top-level keys being every block's defaults.
    `overrides` (the command line's options) apply to every block."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CampaignError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CampaignError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise CampaignError(f"{path}: not valid TOML: {e}") from None
    blocks: list[tuple[str, dict[str, Any]]]
    block = data.pop("matrix", None)
    if isinstance(block, list):
        if not block or not all(isinstance(b, dict) for b in block):
            raise CampaignError(f"{path}: [[matrix]] must be one or more tables")
        blocks = [(f"[[matrix]] {i + 1}: ", {**data, **b}) for i, b in enumerate(block)]
    elif block is not None:
        if not isinstance(block, dict) or data:
            raise CampaignError(f"{path}: [matrix] must be a table and the only one in the file")
        blocks = [("", block)]
    else:
        blocks = [("", data)]
    out = []
    for where, values in blocks:
        if unknown := sorted(set(values) - set(MATRIX_KEYS)):
            raise CampaignError(f"{path}: {where}unknown keys {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(MATRIX_KEYS))}")
        try:
            parsed = {k: MATRIX_KEYS[k](v) for k, v in values.items()}
        except _BadValue as e:
            raise CampaignError(f"{path}: {where}{e}") from None
        out.append(replace(Matrix(**parsed), **{k: v for k, v in overrides.items() if v is not None}))
    return out


class _BadValue(ValueError):
    pass


def _items(key: str, value: object, item: Callable[[object], Any]) -> tuple[Any, ...]:
    """A list, or (as on the command line) one comma-separated string."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise _BadValue(f"{key} must be a non-empty list, or a comma-separated string")
    try:
        return tuple(item(v) for v in value)
    except (TypeError, ValueError):
        raise _BadValue(f"{key}: {value!r} holds a value of the wrong type") from None


def _name(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(v)
    return v


def _window(v: object) -> str:
    """Seconds as a number or a string, or "inf"/"default": checked as a window by `cells`."""
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else _name(v)


def _barrier(v: object) -> str:
    return barrier_name(v) if isinstance(v, bool) else _name(v)


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise TypeError(v)
    return int(v)


def _int_in(key: str, lo: int | None, hi: int | None) -> Callable[[object], int]:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _BadValue(f"{key} must be an integer, not {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _BadValue(f"{key} {v} is out of range {lo if lo is not None else ''}.."
                            f"{hi if hi is not None else ''}")
        return v
    return check


def _text(key: str, v: object) -> str:
    if not isinstance(v, str):
        raise _BadValue(f"{key} must be a string, not {v!r}")
    return v


def _strategy(v: object) -> str:
    if not isinstance(v, str):
        raise _BadValue(f"strategy must be a string, not {v!r}")
    return v


def _scheduler(v: str) -> str:
    try:
        return cluster.parse_address(v)
    except cluster.ClusterError as e:
        raise _BadValue(str(e)) from None


# The keys a matrix TOML may hold (the fields of Matrix), each with what takes its value apart;
# names are checked as names when the matrix's cells are made, before anything runs.
MATRIX_KEYS: dict[str, Callable[[object], Any]] = {
    "fs": lambda v: _items("fs", v, _name),
    "cache": lambda v: _items("cache", v, _name),
    "barrier": lambda v: _items("barrier", v, _barrier),
    "recorder": lambda v: _items("recorder", v, _name),
    "workload": lambda v: _items("workload", v, _name),
    "window": lambda v: _items("window", v, _window),
    "torn": lambda v: _items("torn", v, _int),
    "states": _int_in("states", 1, MAX_STATES),
    "seed": _int_in("seed", None, None),
    "scale": _int_in("scale", 1, None),
    "strategy": _strategy,
    "storage": lambda v: _items("storage", v, _name),
    "disk": lambda v: _items("disk", v, _name),
    "aio": lambda v: _items("aio", v, _name),
    "discard": lambda v: _text("discard", v),
    "detect_zeroes": lambda v: _text("detect_zeroes", v),
    "kernel": lambda v: _text("kernel", v),
    "modules": lambda v: _text("modules", v),
    "qemu": lambda v: _text("qemu", v),
    "scheduler": lambda v: _scheduler(_text("scheduler", v)),
    "shared_recordings": lambda v: _text("shared_recordings", v),
}


# --- units of work ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordUnit:
    """One guest boot that records one cell, or several that can share it (record.series): a
    guest hot-plugs each cell's disk in turn, so a boot and a Python start are paid once."""

    cells: tuple[Cell, ...]
    out_dirs: tuple[str, ...]


@dataclass(frozen=True)
class CheckUnit:
    cell: Cell
    recording: str
    state_ids: tuple[str, ...]
    host_mount: bool = False
    checker: str = "auto"  # crashlab.check.runner.CHECKERS; host_mount means "host"


@dataclass
class StateResult:
    state_id: str
    outcome: Outcome
    detail: dict[str, Any]  # the record's to_dict(), what the store keeps and a worker sends back

    @property
    def record(self) -> CheckRecord:
        return CheckRecord.from_dict(self.detail)


def run_record(unit: RecordUnit) -> list[dict[str, Any] | str]:
    """Record the unit's cells; per cell its run.json, or why it failed. Each records into a
    sibling named for this process and is renamed when finished (record.record_cells), so a
    half-written recording is never mistaken for a finished one and two campaigns recording the
    same cell do not share a directory (the first to finish wins)."""
    for d in unit.out_dirs:
        Path(d).parent.mkdir(parents=True, exist_ok=True)
    runs = record_cells([c.record_config() for c in unit.cells], unit.out_dirs)
    return [str(r) if isinstance(r, Exception) else r for r in runs]


def record_units(cells: Sequence[Cell], out_dirs: Sequence[Path], workers: int) -> list[RecordUnit]:
    """The recordings to make, as units: cells that can share a guest share one, in at most as
    many cells a guest as keeps every worker recording (pure)."""
    per_guest = -(-len(cells) // max(1, workers)) if cells else 0
    groups = record_series([c.record_config() for c in cells], max_cells=per_guest)
    return [RecordUnit(tuple(cells[i] for i in g), tuple(str(out_dirs[i]) for i in g)) for g in groups]


def run_check(unit: CheckUnit, keep_dir: Path | None = None,
              before_check: Callable[[Path], None] | None = None) -> list[StateResult]:
    """Build each state's image and check it: one checker-guest boot for the whole unit. Images
    are thrown away as they are checked, unless `keep_dir` is given; `before_check` sees each
    image as built, before recovery writes to it."""

    rec = GuestOutputs(Path(unit.recording))
    promises_path = rec.promises
    promises = load_promises(promises_path)  # loaded here too: a bad file fails the unit, as it always did
    size = rec.image.stat().st_size
    results: list[StateResult] = []
    with logformat.open_log(rec.log) as reader, \
            tempfile.TemporaryDirectory(prefix="crashlab-states-", dir=crashstates.default_workdir()) as tmp:
        image_dir = keep_dir or Path(tmp)
        entries = reader.index()
        digest = crashstates.log_digest(reader)
        m = cell_model(unit.cell, Path(unit.recording), entries)
        try:
            states = [crashstates.parse_id(s) for s in unit.state_ids]
        except crashstates.CrashStateError as e:
            raise CampaignError(str(e)) from None
        states.sort(key=lambda s: (m.crash(s.end).stable, s.end))

        def item(st: crashstates.CrashState, image: Path, undo: Path | None = None) -> CheckItem:
            present = frozenset(crashstates.present_markers(entries, st.end))
            # Path and seqs let the mount backend (a checker guest) run the oracle on its own
            # mount; the callable judges a copy when that mount cannot be read in full.
            return CheckItem(image, unit.cell.fs, st.id, promises.oracle(present), promises=promises_path,
                             present=present, undo=undo)

        def materializer() -> crashstates.Materializer:
            return crashstates.Materializer(reader, m, digest, size=size)

        if keep_dir is None and before_check is None and checks_in_place(unit):
            return [StateResult(r.state_id, r.outcome, r.to_dict())
                    for r in inplace.check_in_place(unit.cell.fs, states, materializer, item, Path(tmp))]
        items = []
        with materializer() as mat:
            for st in states:
                image = image_dir / f"{st.id}.img"
                mat.build(st, image)
                if before_check is not None:
                    before_check(image)
                items.append(item(st, image))
        # The cell's own kernel and QEMU, if it names them, boot the checker guest too: XFS and
        # btrfs recovery is that kernel's code.
        for record in check_batch(items, host_mount=unit.host_mount, checker=unit.checker,
                                  kernel=unit.cell.kernel, modules=unit.cell.modules, qemu=unit.cell.qemu):
            results.append(StateResult(record.state_id, record.outcome, record.to_dict()))
            if keep_dir is None:
                Path(record.image).unlink(missing_ok=True)
    return results


def checks_in_place(unit: CheckUnit) -> bool:
    """Whether the unit's states are judged on the shared base image, no copy each (check.inplace)."""
    return inplace.applies(unit.cell.fs, unit.checker, unit.host_mount)


def reproduce(cell: Cell, recording: Path, state_id: str, keep: Path | None = None,
              host_mount: bool = False) -> StateResult:
    """Rebuild one state's image from its id and check it again; `keep` leaves the image there.

    Checking recovers the image (journal replay writes to it), so the kept image is the state as
    built, copied before the check."""
    def keep_copy(image: Path) -> None:
        if keep is not None:
            crashstates.sparse_copy(image, keep)

    unit = CheckUnit(cell, str(recording), (state_id,), host_mount)
    with tempfile.TemporaryDirectory(prefix="crashlab-reproduce-", dir=crashstates.default_workdir()) as tmp:
        return run_check(unit, keep_dir=Path(tmp), before_check=keep_copy)[0]


def cell_model(cell: Cell, recording: Path, entries: list[logformat.Entry]) -> model.LogModel:
    """The model a cell's states are read with. A cell reads its own recording, so its recorder and
    cache mode are the recorded ones; a run.json that says otherwise (a recording moved or reused
    by hand) is refused rather than read as a silent counterfactual, as is a torn unit the log's
    sector size rules out."""
    try:
        model.reading(model.recorded(_read_json(recording / "run.json")), cell.recorder, cell.cache.name)
        return model.LogModel(entries, cell.model_config())
    except ValueError as e:
        raise CampaignError(f"cell {cell.key}: {e}") from None


def sampling_seed(cell: Cell) -> int:
    """The seed a cell's crash states are drawn with: its key (which holds the run seed) hashed, so
    each cell is an independent sample whatever else the matrix holds, and two cells that share a
    recording (window, torn writes) do not share draws. The workload still runs with `cell.seed`."""
    return int.from_bytes(hashlib.sha256(f"states {cell.key}".encode()).digest()[:8], "big")


def generate_states(cell: Cell, recording: Path, count: int) -> list[str]:
    """The cell's first `count` crash-state ids, deterministic from its sampling seed."""

    with logformat.open_log(GuestOutputs(recording).log) as reader:
        m = cell_model(cell, recording, reader.index())
        camp = crashstates.generate(m, crashstates.log_digest(reader), count, sampling_seed(cell),
                                    cell.strategy)
        return [s.id for s in camp.states]


# --- the driver ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """A state that did not come out consistent, as the display shows it when it arrives."""

    cell: Cell
    state_id: str
    outcome: Outcome
    reason: str
    checker_fault: str = ""


@dataclass
class Progress:
    """What the display shows; the driver calls `on_progress` after every unit."""

    cells: int = 0
    states: int = 0  # asked per cell
    workers: int = 1
    recorded: int = 0
    states_total: int = 0  # ids generated so far, for the cells whose recording is done
    states_done: int = 0
    resumed: int = 0  # states found already stored
    retried: int = 0  # stored checker-errors checked again
    unscheduled: int = 0  # cells whose states are not generated yet (recording under way)
    started: float = field(default_factory=time.monotonic)
    check_seconds: float = 0.0  # worker seconds in finished check units
    checked: int = 0  # states those units stored
    current: str = ""  # what the oldest unit in flight is doing
    arrived: list[Finding] = field(default_factory=list)  # not consistent, from the latest unit
    unchecked: Counter[str] = field(default_factory=Counter)  # checker-errors this run, by cause
    failed_units: list[str] = field(default_factory=list)
    dashboard: str = ""  # the Dask dashboard's address, when one is running

    @property
    def total(self) -> int:
        """States this run will have stored when done: generated ones, `states` per cell to come."""
        return self.states_total + self.unscheduled * self.states

    @property
    def rate(self) -> float:
        """States per second with every worker checking. Measured in the workers' own time in check
        units, so time spent recording, or waiting behind recordings, does not dilute it."""
        return self.workers * self.checked / self.check_seconds if self.check_seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds of checking left; None until a check unit has finished."""
        rate = self.rate
        return (self.total - self.states_done) / rate if rate > 0 else None


def unchecked_cause(record: CheckRecord) -> str:
    """Why a checker-error state could not be checked, in a few words to count by: the checker's
    fault if it was one, else the step and its first words (`recovery: guest hung mounting this
    image`), without the console tail or a tool's output."""
    return record.checker_fault or ": ".join(record.reason.split(": ")[:2])


def versions(fs: Iterable[str]) -> dict[str, str]:

    v = {"crashlab": crashlab.__version__,
         "qemu": tool_version("qemu-system-x86_64", "--version")}
    for f in sorted(set(fs)):
        v.update(tool_versions(f))
    return v


# What a check unit reads of its recording (run_check): the image only for its size.
CHECK_FILES = ("write.log", "run.json", "promises.jsonl", "data.img")
FAULT_UNIT = f"its check unit failed {cluster.RETRIES + 1} times"


def unit_resources(unit: RecordUnit | CheckUnit) -> dict[str, float]:
    """What a unit asks of its worker: `qemu` when it boots a guest (a recording; a check that is
    not ext4 in userspace); the userspace checker needs nothing but e2fsprogs."""
    if isinstance(unit, CheckUnit):
        userspace = unit.checker == "userspace" or (
            unit.checker == "auto" and not unit.host_mount and unit.cell.fs in USERSPACE_READABLE)
        if userspace or unit.host_mount or unit.checker == "host":
            return {}
    return {"qemu": 1}


def failed_check(cell: Cell, state_id: str, error: str) -> StateResult:
    """A state whose unit failed every try: stored as unchecked with the reason, so the next run
    checks it again, never dropped."""
    rec = CheckRecord(state_id, "", cell.fs, Outcome.CHECKER_ERROR, f"{FAULT_UNIT}: {error}", "",
                      checker_fault=FAULT_UNIT)
    return StateResult(state_id, Outcome.CHECKER_ERROR, rec.to_dict())


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_matrix(cells: list[Cell], states: int, store: Store, results_dir: Path, *, command: str,
               workers: int | None = None, host_mount: bool = False, checker: str = "auto",
               unit_states: int = STATES_PER_UNIT,
               on_progress: Callable[[Progress], None] = lambda p: None,
               scheduler: str | None = None, shared_recordings: Path | None = None,
               on: cluster.Cluster | None = None) -> Progress:
    """Run (or resume) every cell to `states` crash states each, storing outcomes as they arrive.
    A stored checker-error is checked again: it is a gap, not a result. Units run `on` a cluster
    already connected, else on `scheduler`'s, else on a local cluster of `workers` started for
    this call."""
    with contextlib.ExitStack() as stack:
        if on is None:
            on = stack.enter_context(cluster.connect(scheduler, workers, shared=shared_recordings))
        return _drive(on, cells, states, store, results_dir, command=command, host_mount=host_mount,
                      checker=checker, unit_states=unit_states, on_progress=on_progress)


def _drive(on: cluster.Cluster, cells: list[Cell], states: int, store: Store, results_dir: Path, *,
           command: str, host_mount: bool, checker: str, unit_states: int,
           on_progress: Callable[[Progress], None]) -> Progress:
    run_id = store.begin_run(command, {"cells": [c.key for c in cells], "states": states},
                             versions(c.fs for c in cells))
    prog = Progress(cells=len(cells), states=states, workers=on.workers, unscheduled=len(cells),
                    dashboard=on.dashboard or "")
    # Workers on this machine read and write the client's recordings in place; remote ones get
    # them as bundles, unless every host sees one shared directory.
    recordings = on.shared or results_dir / "recordings"
    ship = on.local is None and on.shared is None
    pending: dict[Any, tuple[str, Cell, Any]] = {}
    done = on.as_completed([])
    bundles: dict[Path, Any] = {}
    waiting: dict[Path, list[Cell]] = {}  # recordings under way -> the other cells that need them

    def submit(kind: str, cell: Cell, what: Any, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fut = on.submit(fn, *args, resources=unit_resources(args[0]))
        except cluster.ClusterError as e:
            failed(kind, cell, what, str(e))
            return
        pending[fut] = (kind, cell, what)
        done.add(fut)

    def schedule_checks(cell: Cell, rec_dir: Path) -> None:
        ids = generate_states(cell, rec_dir, states)
        gaps = {r.state_id for r in store.states(cell.key, Outcome.CHECKER_ERROR)}
        stored = store.done(cell.key) - gaps
        todo = [i for i in ids if i not in stored]
        prog.unscheduled -= 1
        prog.states_total += len(ids)
        prog.states_done += len(ids) - len(todo)
        prog.resumed += len(ids) - len(todo)
        prog.retried += sum(i in gaps for i in todo)
        if ship and todo and rec_dir not in bundles:
            bundles[rec_dir] = on.hold(cluster.pack(rec_dir, CHECK_FILES, holes=("data.img",)))
        for k in range(0, len(todo), unit_states):
            unit = CheckUnit(cell, str(rec_dir), tuple(todo[k:k + unit_states]), host_mount, checker)
            submit("check", cell, unit, _check_unit, unit, bundles.get(rec_dir))

    def recorded(cell: Cell, rec_dir: Path) -> None:
        for c in (cell, *waiting.pop(rec_dir, [])):
            store.set_recording(c.key, rec_dir, _read_json(rec_dir / "run.json"))
            prog.recorded += 1
            schedule_checks(c, rec_dir)

    def failed(kind: str, cell: Cell, what: Any, error: str) -> None:
        if kind == "check":  # every try failed: its states are stored as unchecked, with why
            stored([failed_check(cell, sid, error) for sid in what.state_ids], cell)
            return
        for c, rec_dir in zip(what.cells, what.out_dirs, strict=True):
            record_failed(c, Path(rec_dir), error)

    def record_failed(cell: Cell, rec_dir: Path, error: str) -> None:
        sharers = waiting.pop(rec_dir, [])
        prog.failed_units += [f"record {c.key}: {error}" for c in (cell, *sharers)]
        prog.unscheduled -= 1 + len(sharers)

    def stored(results: list[StateResult], cell: Cell) -> None:
        for r in results:
            if not store.put_state(cell.key, r.state_id, r.outcome, r.detail, run_id):
                continue  # another campaign (or an earlier try of this unit) stored it first
            prog.states_done += 1
            prog.checked += 1
            rec = r.record
            if r.outcome is Outcome.CHECKER_ERROR:
                prog.unchecked[unchecked_cause(rec)] += 1
            if r.outcome is not Outcome.CONSISTENT:
                prog.arrived.append(Finding(cell, r.state_id, r.outcome, rec.reason, rec.checker_fault))

    def show() -> None:
        # Units start in submission order, as far as the workers go: the oldest one unfinished
        # is under way.
        kind, cell, _ = next(iter(pending.values()), ("", None, None))
        prog.current = f"{'checking' if kind == 'check' else 'recording'} {cell.label}" if cell else ""
        on_progress(prog)
        prog.arrived = []

    # A kill (SIGTERM) is handled like Ctrl-C: stop, keep what is stored; leaving `connect` tears
    # the local cluster down, its workers unwinding their units first.
    with signals.sigterm_raises():
        to_record: list[Cell] = []
        for cell in cells:
            store.put_cell(cell.key, cell.config(), run_id)
            rec_dir = recordings / cell.recording_slug
            if (rec_dir / "run.json").exists():
                prog.recorded += 1
                store.set_recording(cell.key, rec_dir, _read_json(rec_dir / "run.json"))
                schedule_checks(cell, rec_dir)
            elif rec_dir in waiting:
                waiting[rec_dir].append(cell)
            else:
                waiting[rec_dir] = []
                to_record.append(cell)
        for unit in record_units(to_record, [recordings / c.recording_slug for c in to_record], on.workers):
            submit("record", unit.cells[0], unit, _record_unit, unit, ship)
        show()
        for fut in done:
            kind, cell, what = pending.pop(fut)
            try:
                seconds, result = fut.result()
            except Exception as e:  # every try failed (a worker died under it, too)
                if isinstance(e, CancelledError) and (gone := on.lost()) is not None:
                    raise gone from None  # what is stored stays; a rerun resumes
                failed(kind, cell, what, _error(e))
                show()
                continue
            if kind == "record":
                for c, rec_dir, run in zip(what.cells, what.out_dirs, result, strict=True):
                    if isinstance(run, str):  # this cell failed; the unit's others are recorded
                        record_failed(c, Path(rec_dir), run)
                        continue
                    if ship:  # a recording already there (another campaign) wins
                        cluster.unpack(run[1], Path(rec_dir))
                    recorded(c, Path(rec_dir))
            else:
                prog.check_seconds += seconds
                stored(result, cell)
            show()
    return prog


def _record_unit(unit: RecordUnit, ship: bool) -> tuple[float, list[Any]]:
    """On a worker: record the unit's cells, into their recording directories when the worker sees
    them, else into the worker's scratch and back to the client as bundles (the whole recording:
    the client keeps it, as it keeps the store); per cell the run (with its bundle) or why not."""
    t0 = time.monotonic()
    if not ship:
        return time.monotonic() - t0, run_record(unit)
    here = [rundir.scratch() / "recordings" / Path(d).name for d in unit.out_dirs]
    try:
        runs = run_record(replace(unit, out_dirs=tuple(map(str, here))))
        return time.monotonic() - t0, [r if isinstance(r, str) else (r, cluster.pack(h))
                                       for r, h in zip(runs, here, strict=True)]
    finally:
        for h in here:
            shutil.rmtree(h, ignore_errors=True)


def _check_unit(unit: CheckUnit, bundle: cluster.Bundle | None) -> tuple[float, list[StateResult]]:
    """On a worker: check one unit's states, its recording taken from the bundle when shipped
    (unpacked once per worker, by digest). The seconds are the checking phase's rate."""
    if bundle is not None:
        unit = replace(unit, recording=str(cluster.cached(bundle)))
    t0 = time.monotonic()
    result = run_check(unit)
    return time.monotonic() - t0, result


def state_rows(store: Store, state_id: str) -> Iterator[tuple[Cell, Path]]:
    """The cells (and their recordings) in which a state id was checked."""
    for row in store.find_state(state_id):
        cell_row = store.cell(row.cell)
        if cell_row and cell_row.recording:
            yield Cell.from_config(cell_row.config), Path(cell_row.recording)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


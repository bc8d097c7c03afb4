"""crashlab as a pytest plugin: crash-consistency campaigns as ordinary test results.

Registered through the `pytest11` entry point, so installing crashlab is enough. It adds:

- `--crashlab-*` options naming the policy under test (filesystems, cache mode, barrier, states,
  seed, workload) and where results live (`--crashlab-store`: reused across runs, so a rerun only
  checks what is new);
- the `crashlab_cell` fixture: `crashlab_cell(fs=..., cache=..., ...)` runs or reuses one campaign
  cell and returns a `CellRun` with the stored outcomes, `.assert_safe()` and
  `.assert_detects_failures()`; `crashlab_cell.sensitivity()` is the gate's known-unsafe cell;
- `crashlab_fs`: a test asking for it runs once per `--crashlab-fs` filesystem;
- the `crashlab` marker for tests that boot guests (added to every test using `crashlab_cell`);
- failing crash states in the report: id, outcome, fsck output and the `crashlab reproduce` command
  in the failure message (and so in `--junitxml`), the cell's rates as a report section and as
  JUnit properties.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Imported where used: this module loads in every pytest session of an environment with crashlab
# installed, and should cost nothing in the ones that never run a campaign.
if TYPE_CHECKING:
    from crashlab import gate, stats
    from crashlab.campaign import Cell
    from crashlab.store import StateRow

MARKER = "crashlab"
_RUNS = pytest.StashKey["dict[tuple[Cell, int], CellRun]"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("crashlab", "crash-consistency campaigns (crashlab)")
    g.addoption("--crashlab-fs", default="ext4", metavar="FS[,FS...]",
                help="Filesystems of the policy under test; tests using crashlab_fs run once per "
                     "filesystem [default: ext4].")
    g.addoption("--crashlab-cache", default="none", help="Cache mode under test [default: none].")
    g.addoption("--crashlab-barrier", default="on", choices=("on", "off"),
                help="Filesystem barriers [default: on].")
    g.addoption("--crashlab-states", type=int, default=None,
                help="Crash states per cell [default: as many as can pass at --crashlab-max-rate, 299 "
                     "at 1 %%].")
    g.addoption("--crashlab-max-rate", type=float, default=1.0, metavar="PERCENT",
                help="assert_safe passes only if the cell's exact 95 %% upper bound on its failure rate "
                     "is below this [default: 1: 299 states without a failure].")
    g.addoption("--crashlab-seed", type=int, default=1, help="Workload and crash-state seed [default: 1].")
    g.addoption("--crashlab-workload", default="smallfiles", help="Workload [default: smallfiles].")
    g.addoption("--crashlab-scale", type=int, default=1,
                help="Workload scale: a larger one yields more distinct crash states, which a policy "
                     "cell with barriers needs to reach --crashlab-states [default: 1].")
    g.addoption("--crashlab-storage", default="local", choices=("local", "nbd"),
                help="The guest's disk: a local file, or an NBD export logged on its server "
                     "[default: local].")
    g.addoption("--crashlab-strategy", default="random",
                help="Crash-state strategy; 'prefix' is a deliberately blind model [default: random].")
    g.addoption("--crashlab-store", default=None, metavar="PATH",
                help="Results store (SQLite), recordings beside it; reused across runs "
                     "[default: results/crashlab.sqlite under the rootdir].")
    g.addoption("--crashlab-host-mount", action="store_true",
                help="Mount crash images on this host, not in checker guests (disposable hosts only).")
    g.addoption("--crashlab-workers", type=int, default=None,
                help="Workers of the Dask cluster started for the session's cells [default: cores].")
    g.addoption("--crashlab-scheduler", default=None, metavar="tcp://HOST:PORT",
                help="Run the cells on this Dask scheduler's workers (crashlab worker) [default: the "
                     "crashlab_scheduler ini value, else a cluster started on this machine].")
    parser.addini("crashlab_scheduler", "Dask scheduler for crashlab cells (tcp://HOST:PORT)", default="")
    g.addoption("--crashlab-disk", default=None, help="Data disk model: virtio-blk, virtio-scsi, ide, ahci.")
    g.addoption("--crashlab-aio", default=None, help="Host AIO engine: threads, native, io_uring.")
    g.addoption("--crashlab-domain-xml", default=None, metavar="FILE",
                help="A libvirt domain or <disk> XML: its disk's cache, io, discard, detect_zeroes and bus "
                     "(not with --crashlab-cache/--crashlab-disk/--crashlab-aio).")
    g.addoption("--crashlab-kernel", default=None, metavar="IMAGE",
                help="Your kernel image for the recording guests (with --crashlab-modules).")
    g.addoption("--crashlab-modules", default=None, metavar="DIR", help="Its lib/modules/VERSION directory.")
    g.addoption("--crashlab-qemu", default=None, metavar="BINARY",
                help="qemu-system-x86_64 to boot [default: from PATH].")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: boots QEMU guests to record and check crash states "
                            f"(slow under TCG; deselect with -m 'not {MARKER}')")
    config.stash[_RUNS] = {}
    # Bad values stop the session before collection, not in the first test that boots a guest.
    _fs_list(config.getoption("crashlab_fs"))
    _drive(config)
    _scheduler(config)
    if (states := config.getoption("crashlab_states")) is not None and states < 1:
        raise pytest.UsageError("--crashlab-states must be at least 1")
    if config.getoption("crashlab_scale") < 1:
        raise pytest.UsageError("--crashlab-scale must be at least 1")
    if not 0 < config.getoption("crashlab_max_rate") <= 100:
        raise pytest.UsageError("--crashlab-max-rate must be a percentage above 0 and at most 100")


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so -m 'not crashlab' sees the added marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "crashlab_cell" in getattr(item, "fixturenames", ()):
            item.add_marker(MARKER)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "crashlab_fs" in metafunc.fixturenames:
        fs = _fs_list(metafunc.config.getoption("crashlab_fs"))
        metafunc.parametrize("crashlab_fs", fs, ids=fs)


def _drive(config: pytest.Config) -> dict[str, str]:
    """The disk, kernel and QEMU options as cell fields; a libvirt XML sets the cache mode too."""
    from crashlab import libvirt

    opt = config.getoption
    fields = {k: opt(f"crashlab_{k}") for k in ("disk", "aio") if opt(f"crashlab_{k}")}
    fields |= {k: str(Path(v).absolute()) for k in ("kernel", "modules") if (v := opt(f"crashlab_{k}"))}
    if qemu := opt("crashlab_qemu"):
        fields["qemu"] = str(Path(qemu).absolute()) if "/" in qemu else qemu
    if xml := opt("crashlab_domain_xml"):
        if fields.keys() & {"disk", "aio"} or opt("crashlab_cache") != "none":
            raise pytest.UsageError("--crashlab-domain-xml sets the cache, disk and aio: leave out "
                                    "--crashlab-cache/--crashlab-disk/--crashlab-aio")
        try:
            fields |= libvirt.read(Path(xml)).cell_fields()
        except libvirt.LibvirtError as e:
            raise pytest.UsageError(f"--crashlab-domain-xml {e}") from None
    return fields


def _scheduler(config: pytest.Config) -> str | None:
    """The scheduler named by option or ini value, checked (no scheduler: a local cluster)."""
    from crashlab import cluster

    value = config.getoption("crashlab_scheduler") or str(config.getini("crashlab_scheduler") or "")
    if not value:
        return None
    try:
        return cluster.parse_address(value)
    except cluster.ClusterError as e:
        raise pytest.UsageError(f"--crashlab-scheduler: {e}") from None


def _fs_list(value: str) -> list[str]:
    fs = list(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    if not fs:
        raise pytest.UsageError("--crashlab-fs: name at least one filesystem")
    return fs


@dataclass(frozen=True)
class Options:
    fs: tuple[str, ...]
    cache: str
    barrier: str
    states: int
    max_rate: float  # a fraction, as gate.Policy has it
    seed: int
    workload: str
    strategy: str
    store: Path
    host_mount: bool
    workers: int | None
    command: str
    storage: str = "local"
    drive: dict[str, str] = field(default_factory=dict)  # cell fields of the disk, kernel and QEMU
    scheduler: str | None = None  # a Dask scheduler's address; None: a cluster on this machine
    scale: int = 1

    @classmethod
    def from_config(cls, config: pytest.Config) -> Options:
        from crashlab import stats
        opt = config.getoption
        store = opt("crashlab_store")
        return cls(fs=tuple(_fs_list(opt("crashlab_fs"))), cache=opt("crashlab_cache"),
                   barrier=opt("crashlab_barrier"),
                   states=opt("crashlab_states") or stats.states_needed(opt("crashlab_max_rate") / 100),
                   max_rate=opt("crashlab_max_rate") / 100, seed=opt("crashlab_seed"),
                   workload=opt("crashlab_workload"), strategy=opt("crashlab_strategy"),
                   store=Path(store).absolute() if store else config.rootpath / "results" / "crashlab.sqlite",
                   host_mount=opt("crashlab_host_mount"), workers=opt("crashlab_workers"),
                   command="pytest " + shlex.join(config.invocation_params.args),
                   storage=opt("crashlab_storage"), drive=_drive(config), scheduler=_scheduler(config),
                   scale=opt("crashlab_scale"))

    @property
    def policy(self) -> gate.Policy:
        """The options as the gate's policy; raises CampaignError for a bad name."""
        from crashlab import gate
        from crashlab.campaign import Cell

        cell = Cell.parse({"cache": self.cache, "barrier": self.barrier, "workload": self.workload,
                           "seed": self.seed, "strategy": self.strategy, "storage": self.storage,
                           "scale": self.scale, **self.drive}, gate.DEFAULT_CELL)
        return gate.Policy(cell, fs=self.fs, states=self.states, max_rate=self.max_rate)


@dataclass
class CellRun:
    """One cell's stored outcomes after running (or resuming) it."""

    check: gate.CellCheck
    store: Path
    host_mount: bool
    max_rate: float
    problems: list[str] = field(default_factory=list)  # units that failed (recording, checker boot)

    @property
    def cell(self) -> Cell:
        return self.check.cell

    @property
    def failed(self) -> stats.Rate:
        return self.check.failed

    @property
    def failures(self) -> list[StateRow]:
        return self.check.failures

    def summary(self) -> str:
        return self.check.describe()

    def assert_safe(self) -> None:
        """Fail unless every asked state was checked and consistent, and they bound the failure
        rate below --crashlab-max-rate."""
        from crashlab import gate

        decision = gate.decide([self.check], None, self.max_rate)
        if not decision.passed:
            pytest.fail(self._message(decision, self.failures), pytrace=False)

    def assert_detects_failures(self) -> None:
        """Fail unless some state failed: for a configuration known to be unsafe."""
        from crashlab import gate

        decision = gate.decide_sensitivity(self.check)
        if not decision.passed:
            pytest.fail(self._message(decision, []), pytrace=False)

    def _message(self, decision: gate.Decision, rows: list[StateRow]) -> str:
        from crashlab import gate

        out = [decision.verdict, f"cell: {self.summary()}"]
        out += [f"error: {p}" for p in self.problems]
        out += ["", *(gate.describe_state(r, self.store, self.host_mount) + "\n"
                      for r in rows[:gate.STATES_DESCRIBED])]
        if len(rows) > gate.STATES_DESCRIBED:
            out.append(f"... and {len(rows) - gate.STATES_DESCRIBED} more: "
                       + " ".join(r.state_id for r in rows[gate.STATES_DESCRIBED:]))
        return "\n".join(out).rstrip()


class CellFactory:
    """What `crashlab_cell` is: call it with Cell fields to run (or reuse) that cell."""

    def __init__(self, options: Options, runs: dict[tuple[Cell, int], CellRun], item: pytest.Item) -> None:
        self.options, self.runs, self.item = options, runs, item

    def __call__(self, fs: str | None = None, *, states: int | None = None, **fields: Any) -> CellRun:
        from crashlab.campaign import CampaignError, Cell

        o = self.options
        try:
            base = replace(o.policy, fs=(fs or o.fs[0],)).cells()[0]
            cell = Cell.parse(fields, base).validate()  # fields as a test writes them: names
        except CampaignError as e:
            error = str(e)
        else:
            return self.run(cell, states or o.states)
        pytest.fail(f"crashlab_cell: {error}", pytrace=False)  # outside `except`: no chained traceback

    def sensitivity(self, *, states: int | None = None) -> CellRun:
        """The gate's known-unsafe reference (ext4, cache=unsafe, barrier=off) under this policy's
        workload, seed and crash model."""
        return self.run(self.options.policy.sensitivity_cell(), states or self.options.states)

    def run(self, cell: Cell, states: int) -> CellRun:
        from crashlab import gate
        from crashlab.store import Store

        o = self.options
        key = (cell, states)
        if key not in self.runs:  # run_matrix resumes anyway; this saves its set-up per test
            prog = gate.run_cells([cell], states, o.store, command=o.command, workers=o.workers,
                                  host_mount=o.host_mount, scheduler=o.scheduler)
            with Store(o.store) as store:
                self.runs[key] = CellRun(gate.check(store, cell, states), o.store, o.host_mount,
                                         o.max_rate, list(prog.failed_units))
        run = self.runs[key]
        self.item.add_report_section("call", "crashlab", f"{run.summary()}\nstore: {o.store}")
        r = run.failed
        self.item.user_properties += [("crashlab cell", cell.key), ("crashlab failed", f"{r.k}/{r.n}"),
                                      ("crashlab upper95", f"{r.upper95:.4f}")]
        return run


@pytest.fixture(scope="session")
def crashlab_options(pytestconfig: pytest.Config) -> Options:
    return Options.from_config(pytestconfig)


@pytest.fixture
def crashlab_cell(request: pytest.FixtureRequest, crashlab_options: Options) -> CellFactory:
    return CellFactory(crashlab_options, request.config.stash[_RUNS], request.node)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runs = config.stash.get(_RUNS, {})
    if not runs:
        return
    terminalreporter.write_sep("-", "crashlab")
    for run in runs.values():
        terminalreporter.write_line(run.summary())
    terminalreporter.write_line(f"store: {next(iter(runs.values())).store} "
                                "(rerun to reuse; `crashlab report --store ...` for the full table)")

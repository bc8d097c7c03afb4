"""Session fixtures for the real-guest tests: one provisioned guest, and each recording made once.

Test modules load this with `pytest_plugins = ["conftest_guest"]`. Boots under TCG cost ~15 s each,
so recordings are shared: `recordings.get(recorder, barrier, cache)` records on first use and hands
the same `Recording` to every later test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crashlab.cachemodes import cache_mode
from crashlab.guest.provision import Guest, provision
from crashlab.record import RecordConfig, Recording, record
from crashlab.recorders import Recorder

GUEST_WORKLOADS = str(Path(__file__).parent / "guest_workloads")


@pytest.fixture(scope="session")
def guest() -> Guest:
    return provision()


class Recordings:
    def __init__(self, root: Path, guest: Guest) -> None:
        self.root, self.guest = root, guest
        self.made: dict[tuple[object, ...], Recording] = {}

    def get(self, recorder: str, barrier: bool = True, cache: str = "writeback", fs: str = "ext4",
            workload: str = "smallfiles", **kw: object) -> Recording:
        key = (recorder, barrier, cache, fs, workload, tuple(sorted(kw.items())))
        if key not in self.made:
            config = RecordConfig(fs=fs, cache=cache_mode(cache), barrier=barrier,
                                  recorder=Recorder(recorder), workload=workload,
                                  accel=os.environ.get("CRASHLAB_ACCEL", "auto"),
                                  workload_path=(GUEST_WORKLOADS,), timeout_s=300, **kw)  # type: ignore[arg-type]
            name = "-".join(str(k) for k in key[:5])
            self.made[key] = record(config, self.root / name, guest=self.guest)
        return self.made[key]


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory, guest: Guest) -> Recordings:
    return Recordings(tmp_path_factory.mktemp("recordings"), guest)

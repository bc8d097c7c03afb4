"""A real Dask cluster on this machine, as on separate hosts: `dask scheduler` and two `crashlab
worker` processes, a tiny real matrix submitted with --scheduler (its recording made on a worker
and shipped back), then the same with one worker SIGKILLed mid-run: every state exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crashlab import campaign

pytestmark = pytest.mark.guest

pytest_plugins = ["campaign_fakes"]
CRASHLAB = [sys.executable, "-m", "crashlab"]
CELL = ["--fs", "ext4", "--cache", "writeback", "--barrier", "on", "--workload", "smallfiles", "--seed", "7"]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.env = {**os.environ, "CRASHLAB_TEST_TAG": self.tag}
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        info = root / "scheduler.json"
        self.spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                    "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
                   "scheduler")
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.address = json.loads(info.read_text())["address"]
        self.workers = [self.spawn([*CRASHLAB, "worker", "--scheduler", self.address, "-j", "1"],
                                   f"worker{i}") for i in range(2)]
        self.wait_for_workers(2)

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (the process keeps it)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def client(self) -> object:
        from distributed import Client

        return Client(self.address, timeout=30, set_as_default=False)

    def wait_for_workers(self, n: int) -> None:
        c = self.client()
        try:
            c.wait_for_workers(n, timeout=120)  # type: ignore[attr-defined]
        finally:
            c.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory,
                 tagged: Callable[[str], list[str]]) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        yield c
    finally:
        c.close()
        deadline = time.monotonic() + 30
        while tagged(c.tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not tagged(c.tag), "the cluster left processes behind"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("results")  # one recordings/ for both tests: recorded once


def rows(store: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT cell, state_id, outcome FROM states").fetchall()


def count(store: Path) -> int:
    try:
        with sqlite3.connect(store, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM states").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_a_matrix_on_a_remote_cluster_counts_add_up(dask_cluster: Cluster, results: Path) -> None:
    store = results / "first.sqlite"
    r = subprocess.run([*CRASHLAB, "run", *CELL, "--states", "4", "--unit-states", "2", "-q",
                        "--scheduler", dask_cluster.address, "--store", str(store)],
                       capture_output=True, text=True, timeout=600, env=dask_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not r.stderr, r.stderr  # no Dask chatter on the terminal
    got = rows(store)
    assert len(got) == 4 and len({sid for _, sid, _ in got}) == 4
    assert all(o != "checker-error" for *_, o in got), got
    # The recording was made on a worker and came back: the client keeps it beside its store.
    (rec,) = [p for p in (results / "recordings").iterdir() if not p.name.startswith(".")]
    assert {"write.log", "run.json", "promises.jsonl", "data.img"} <= {p.name for p in rec.iterdir()}
    assert rec.name == campaign.Cell.parse({"seed": 7}).recording_slug


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(dask_cluster: Cluster, results: Path) -> None:
    store = results / "killed.sqlite"  # the recording is there: check units alone, on both workers
    states = 40
    p = subprocess.Popen([*CRASHLAB, "run", *CELL, "--states", str(states), "--unit-states", "2", "-q",
                          "--scheduler", dask_cluster.address, "--store", str(store)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dask_cluster.env)
    from distributed import Client

    client = Client(dask_cluster.address, timeout=30, set_as_default=False)  # type: ignore[no-untyped-call]
    killed, at = None, 0
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and p.poll() is None:
            busy = [a for a, keys in client.processing().items() if keys]
            if busy and count(store) >= 2:
                pids = client.run(os.getpid, workers=busy[:1])
                killed = next(iter(pids.values()))
                os.killpg(os.getpgid(killed), signal.SIGKILL)  # the host is gone: nanny, worker, guests
                at = count(store)
            time.sleep(0.1)
        out, err = p.communicate(timeout=600)
    finally:
        client.close()
        if p.poll() is None:
            p.kill()
    assert killed is not None, "the run ended before a worker could be killed"
    assert at < states - 2, f"killed too late to matter: {at} of {states} states were stored"
    assert p.returncode == 0, out + err
    got = rows(store)
    assert len(got) == states and len({sid for _, sid, _ in got}) == states
    assert all(o != "checker-error" for *_, o in got), got
